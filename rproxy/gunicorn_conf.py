"""gunicorn's settings as a module: `gunicorn -c python:rproxy.gunicorn_conf`.

Works in any directory with only the package installed. The INI is the file
given to --paste, else $RPROXY_CONFIG, else conf/rproxy.ini in the current
directory; it sets bind, workers, the worker class, timeouts, TLS, HTTP/2,
logging, the pidfile and the control socket (gunicorn's command-line flags
still override). A checkout's gunicorn.conf.py is a shim over this module.
"""

import os
import sys

from rproxy.server import settings as server_settings


def _forget_module(arbiter) -> None:
    """gunicorn reads a python: config with import_module, which would hand a
    HUP the module cached at start, settings and all: once gunicorn has read
    it, forget it, so that a reload runs it again and so re-reads the INI."""
    sys.modules.pop(__name__, None)


def _after(hook, then):
    if hook is None:
        return then

    def both(arbiter) -> None:
        hook(arbiter)
        then(arbiter)
    return both


def settings(cwd: str, argv: list[str]) -> dict:
    found = server_settings.ini_path(cwd, argv)
    if not os.environ.get("RPROXY_CONFIG") and not os.path.exists(found):
        print(f"rproxy: no config: {found} does not exist; name yours with RPROXY_CONFIG=/path/to/rproxy.ini "
              "(`rproxy sample-config` prints a commented one to start from)", file=sys.stderr, flush=True)
        raise SystemExit(2)
    # As gunicorn.conf.py in the current directory would: conf/rproxy.ini is beside it.
    result = dict(server_settings.gunicorn_settings(os.path.join(cwd, "gunicorn.conf.py"), argv))
    for hook in ("on_starting", "on_reload"):
        result[hook] = _after(result.get(hook), _forget_module)
    return result


globals().update(settings(os.getcwd(), sys.argv))
