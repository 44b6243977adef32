"""PasteDeploy's way in, for legacy deployments that keep their INI as it is.

`[app:main] use = egg:rproxy` is the app (`gunicorn -c python:rproxy.gunicorn_conf
--paste FILE`); `[server:main] use = egg:rproxy` is a server runner for
pserve-style launchers, which serves the same INI under gunicorn with
rproxy's settings, as `gunicorn -c python:rproxy.gunicorn_conf` would.

A bare `gunicorn --paste FILE` never reads rproxy's settings: gunicorn would
serve the proxy with its sync worker on its own default bind, without the
[server] section's guards. The app refuses that with one line naming the
command that works.
"""

from __future__ import annotations

import os
import shlex
import sys

from rproxy.server import settings as server_settings

# The command that serves an INI with rproxy's settings, from any directory.
SETTINGS_MODULE = "python:rproxy.gunicorn_conf"


def app_factory(global_conf, **local_conf):
    """`[app:main] use = egg:rproxy`; `config = FILE` names another INI."""
    path = os.path.abspath(local_conf.get("config") or global_conf["__file__"])
    if server_settings.serving_config() is None:
        if "gunicorn.workers.base" in sys.modules:
            # In a gunicorn worker whose master never read rproxy's settings.
            from gunicorn.errors import AppImportError
            raise AppImportError(f"rproxy: gunicorn ran without rproxy's settings (worker, bind, limits "
                                 f"from [server]); start it with: {working_command(sys.argv)}")
        # Outside gunicorn (pserve and the like load the app in the process
        # that will fork the workers): build it where it serves.
        return Deferred(path)
    from rproxy.app import build
    return build(path)


def working_command(argv: list[str]) -> str:
    """`argv` (a bare `gunicorn --paste FILE ...`) with rproxy's settings
    module, and without a worker class that would override rproxy's."""
    kept, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg in ("-k", "--worker-class"):
            skip = True
        elif not arg.startswith(("--worker-class=", "-k")):
            kept.append(arg)
    return shlex.join(["gunicorn", "-c", SETTINGS_MODULE, *kept])


class Deferred:
    """The proxy for `path`, built on its first request, in the process that serves it."""

    def __init__(self, path: str):
        from rproxy import config
        try:
            config.load(path)  # a bad config fails now, in the launcher
        except config.ConfigError as e:
            print(f"rproxy: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        self.path = path
        self.app = None

    def __call__(self, environ, start_response):
        if self.app is None:
            from rproxy.app import build
            self.app = build(self.path)
        return self.app(environ, start_response)


def serve(app, global_conf, **local_conf):
    """`[server:main] use = egg:rproxy`: serve the INI under gunicorn with
    rproxy's settings. `host` and `port`, or any gunicorn setting, in
    [server:main] override the INI's, as gunicorn's flags would; `app` (what
    the launcher loaded) is not used: each worker builds its own."""
    from gunicorn.app.base import BaseApplication
    from gunicorn.config import Config

    path = os.path.abspath(global_conf["__file__"])
    overrides = dict(local_conf)
    host, port = overrides.pop("host", ""), overrides.pop("port", "")
    if host or port:
        overrides["bind"] = f"{host or '127.0.0.1'}:{port or 8080}"
    unknown = sorted(set(overrides) - set(Config().settings))
    if unknown:
        print(f"rproxy: {path}: [server:main] {unknown[0]}: not a gunicorn setting", file=sys.stderr)
        raise SystemExit(2)
    os.environ["RPROXY_CONFIG"] = path

    class Runner(BaseApplication):
        def load_config(self):
            # Again at each reload (HUP): the INI is read anew.
            settings = server_settings.gunicorn_settings(path, argv=[])
            for key, value in {**settings, **overrides}.items():
                self.cfg.set(key, value)

        def load(self):
            from rproxy.app import build
            return build(path)

    Runner().run()
