"""gunicorn.conf.py with a master that takes a second between reading its
config and installing its signal handlers (gunicorn's on_starting hook runs
in between): what a busy machine or a slow pidfile disk does to a start-up,
made long enough for a test to send a signal into it."""

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from rproxy.server.settings import gunicorn_settings  # noqa: E402

globals().update(gunicorn_settings(os.path.join(REPO, "gunicorn.conf.py")))


def on_starting(server):
    time.sleep(1.0)
