"""gunicorn settings for rproxy in a checkout: `gunicorn -c gunicorn.conf.py`.

A shim over the installed module `rproxy.gunicorn_conf` (`gunicorn -c
python:rproxy.gunicorn_conf` anywhere else): everything comes from the INI
named by $RPROXY_CONFIG, default conf/rproxy.ini beside this file.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# Serve from a checkout without installing too (once: a reload runs this file again).
if sys.path[:1] != [HERE]:
    sys.path.insert(0, HERE)
os.environ.setdefault("RPROXY_CONFIG", os.path.join(HERE, "conf", "rproxy.ini"))

from rproxy.gunicorn_conf import *  # noqa: E402,F401,F403
