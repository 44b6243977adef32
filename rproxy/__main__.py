"""`python -m rproxy ...`: the same as the `rproxy` command."""

import sys

from rproxy.cli import main

sys.exit(main())
