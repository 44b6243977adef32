"""gunicorn settings for rproxy: `gunicorn -c gunicorn.conf.py`.

Everything comes from the INI named by $RPROXY_CONFIG (default
conf/rproxy.ini): bind, workers, worker_connections, keepalive,
graceful_timeout, logging. gunicorn's command-line flags still override.
"""

import os
import sys

# Serve from a checkout without installing too.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rproxy.serving import gunicorn_settings  # noqa: E402

globals().update(gunicorn_settings(__file__))
