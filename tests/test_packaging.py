"""The wheel, installed into a fresh virtualenv outside the checkout, runs
the documented way: `RPROXY_CONFIG=... gunicorn -c python:rproxy.gunicorn_conf`
answers, `rproxy --version`, `python -m rproxy`, `rproxy check`, and reload
and stop through `rproxy reload`/`rproxy stop`."""

import os
import subprocess
import sys
import time
import venv

import pytest
import requests
from conftest import REPO, Process, free_port, single_route, wait_for_port


def run(args, cwd, env=None, timeout=300):
    out = subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert out.returncode == 0, f"{args}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with only the wheel built from this checkout (and its dependencies)."""
    root = tmp_path_factory.mktemp("installed")
    wheels = root / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
         "-w", str(wheels), str(REPO)], cwd=root, timeout=600)
    wheel, = wheels.glob("rproxy-*.whl")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)], cwd=root,
        timeout=600)
    return env_dir / "bin"


def clean_env(bin_dir):
    """No trace of the checkout: not on the path, no RPROXY_CONFIG, the venv's tools first."""
    env = {k: v for k, v in os.environ.items() if k not in ("RPROXY_CONFIG", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    return env


def test_wheel_carries_the_package_data_and_no_checkout_files(installed, tmp_path):
    out = run([str(installed / "python"), "-c", "import rproxy, importlib.metadata as m; print(rproxy.__file__); "
               "print(m.version('rproxy')); print(m.metadata('rproxy')['License-Expression'])"],
              cwd=tmp_path, env=clean_env(installed))
    where, version, license_ = out.stdout.split()
    assert where.startswith(str(installed.parent)) and "site-packages" in where
    from rproxy import __version__
    assert version == __version__ and license_ == "MIT"
    sample = run([str(installed / "rproxy"), "sample-config"], cwd=tmp_path, env=clean_env(installed)).stdout
    assert sample == (REPO / "rproxy" / "default.ini").read_text()


def test_installed_proxy_runs_the_documented_way(installed, tmp_path, upstream):
    env = clean_env(installed)
    from rproxy import __version__
    assert run([str(installed / "rproxy"), "--version"], cwd=tmp_path, env=env).stdout.strip() \
        == f"rproxy {__version__}"
    assert run([str(installed / "python"), "-m", "rproxy", "--version"], cwd=tmp_path, env=env).stdout.strip() \
        == f"rproxy {__version__}"

    port = free_port()
    ini = tmp_path / "etc-rproxy.ini"
    ini.write_text(f"[server]\nbind = 127.0.0.1:{port}\n\n" + single_route(upstream.port))
    assert "ok (1 routes" in run([str(installed / "rproxy"), "check", str(ini)], cwd=tmp_path, env=env).stdout

    proc = Process([str(installed / "gunicorn"), "-c", "python:rproxy.gunicorn_conf"], tmp_path / "proxy.log",
                   env=dict(env, RPROXY_CONFIG=str(ini)), cwd=tmp_path)
    try:
        wait_for_port(port, proc.proc)
        r = requests.get(f"http://127.0.0.1:{port}/echo", timeout=15)
        assert r.status_code == 200 and r.json()["request_line"] == "GET /echo HTTP/1.1"
        assert "Using worker: rproxy.server.worker.Worker" in proc.log()

        ini.write_text(f"[server]\nbind = 127.0.0.1:{port}\n\n" + single_route(upstream.port)
                       + "[route:v2]\npath = /v2\nupstream = app\nstrip_prefix = yes\n")
        run([str(installed / "rproxy"), "reload", str(ini)], cwd=tmp_path, env=env)
        deadline = time.monotonic() + 20
        while requests.get(f"http://127.0.0.1:{port}/v2/echo", timeout=10).json()["request_line"] \
                != "GET /echo HTTP/1.1":
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.1)

        run([str(installed / "rproxy"), "stop", str(ini)], cwd=tmp_path, env=env)
        assert proc.proc.wait(15) == 0
        assert "Traceback" not in proc.log()
    finally:
        proc.stop()
