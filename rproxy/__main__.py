"""`python -m rproxy ...`: the same as the `rproxy` command."""

import sys

from .cli import main

sys.exit(main())
