"""What rproxy is measured against besides nginx, for scripts/bench.py:

- `hello`: gunicorn's gevent worker answering a 100-byte hello-world app
  itself, from rproxy's own .venv (same gunicorn, same C parser): the
  ceiling of the stack, since a proxy on that worker cannot beat it
  answering without an upstream hop; `hello-pyparser` is the same on
  gunicorn's pure-Python parser (what `pip install gunicorn` gives);
- `wsgiproxy2`: WSGIProxy2's HostProxy under gunicorn's gevent worker;
- `proxy.py`: proxy.py in reverse-proxy mode, one worker, a thread per
  connection.

The peers live in their own venv (.bench-venv), made by `bench.py --setup`,
so that their dependencies never mix with rproxy's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import dev
from bench_common import GUNICORN, ROOT, Service, cpus, say, wait_port

PEERS_VENV = ROOT / ".bench-venv"
PEER_PACKAGES = ["WSGIProxy2==0.5.1", "proxy.py==2.4.10", "gunicorn==27.0.1", "gevent>=24.10.1", "packaging",
                 "py-spy"]  # py-spy: for `bench.py --profile`
SYSTEM_PACKAGES = {"wrk": "wrk", "nginx": "nginx", "h2load": "nghttp2-client"}

HELLO_APP = '''
BODY = b"x" * 100


def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "100")])
    return [BODY]
'''

WSGIPROXY2_APP = '''
import os
from wsgiproxy import HostProxy

application = HostProxy("http://127.0.0.1:%s" % os.environ["BENCH_UPSTREAM"])
'''

# proxy.py routes by regular expression to full upstream URLs.
PROXYPY_PLUGIN = '''
import os
from proxy.http.server import ReverseProxyBasePlugin

UPSTREAM = "http://127.0.0.1:%s" % os.environ["BENCH_UPSTREAM"]


class Routes(ReverseProxyBasePlugin):
    def routes(self):
        return [(r"/%s$" % name, [("%s/%s" % (UPSTREAM, name)).encode()]) for name in ("100B", "1MiB")]
'''


def setup() -> None:
    """Install what the benchmark drives: Debian's wrk, nginx and h2load,
    rproxy into .venv (scripts/dev.py), and the peers into .bench-venv."""
    missing = sorted({pkg for prog, pkg in SYSTEM_PACKAGES.items()
                      if shutil.which(prog) is None and not Path(f"/usr/sbin/{prog}").exists()})
    if missing:
        if os.geteuid() != 0:
            sys.exit(f"bench needs {' '.join(missing)}: apt-get install {' '.join(missing)}")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    dev.ensure_venv()
    if not (PEERS_VENV / "bin" / "python").exists():
        say(f"creating {PEERS_VENV.name} for the peers")
        venv.EnvBuilder(with_pip=True).create(PEERS_VENV)
    subprocess.run([str(PEERS_VENV / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", *PEER_PACKAGES], check=True)


def peers_installed() -> bool:
    return (PEERS_VENV / "bin" / "gunicorn").exists() and (PEERS_VENV / "bin" / "proxy").exists()


def _gunicorn(binary: Path, tmp: Path, name: str, source: str, port: int, workers: int, env=None,
             extra: tuple = ()) -> Service:
    (tmp / f"{name}.py").write_text(source)
    service = Service([*cpus("proxy"), str(binary), *extra, "-k", "gevent", "-w", str(workers), "--worker-connections",
                       "12000", "--backlog", "4096", "--no-control-socket", "-b", f"127.0.0.1:{port}",
                       "--chdir", str(tmp), "--log-level", "warning", f"{name}:application"],
                      tmp / f"{name}-{port}.out", env=env, cwd=tmp)
    wait_port(port)
    return service


def start_hello(tmp: Path, port: int, workers: int = 1, python_parser: bool = False) -> Service:
    """The hello-world app; with `python_parser`, on gunicorn's pure-Python
    request parser, as a plain `pip install gunicorn` has it."""
    return _gunicorn(GUNICORN, tmp, "bench_hello", HELLO_APP, port, workers,
                     extra=("--http-parser", "python") if python_parser else ())


def start_wsgiproxy2(tmp: Path, port: int, upstream: int, workers: int = 1) -> Service:
    env = dict(os.environ, BENCH_UPSTREAM=str(upstream))
    return _gunicorn(PEERS_VENV / "bin" / "gunicorn", tmp, "bench_wsgiproxy2", WSGIPROXY2_APP, port, workers, env)


def start_proxypy(tmp: Path, port: int, upstream: int, workers: int = 1) -> Service:
    (tmp / "bench_proxypy.py").write_text(PROXYPY_PLUGIN)
    env = dict(os.environ, BENCH_UPSTREAM=str(upstream), PYTHONPATH=str(tmp))
    service = Service([*cpus("proxy"), str(PEERS_VENV / "bin" / "proxy"), "--hostname", "127.0.0.1",
                       "--port", str(port), "--num-workers", str(workers), "--num-acceptors", "1",
                       "--enable-reverse-proxy", "--plugins", "bench_proxypy.Routes", "--log-level", "WARNING",
                       "--backlog", "4096",
                       # Its default threadless mode crashes (selector FileNotFoundError)
                       # under 50 concurrent clients in reverse-proxy mode.
                       "--threaded"],
                      tmp / f"proxypy-{port}.out", env=env, cwd=tmp)
    wait_port(port)
    return service
