"""Set up and run rproxy from a checkout, with nothing but python3 installed.

    python3 scripts/dev.py run     install into .venv, start the demo upstream
                                   on :8081 and rproxy on :8080 (conf/rproxy.ini)
    python3 scripts/dev.py test    install into .venv with the test extras and
                                   the system packages the tests use, run pytest
                                   on 3 pytest-xdist workers (extra arguments go
                                   to pytest; -n 0 runs in one process)
    python3 scripts/dev.py test --quick
                                   the fast tier: in-process tests only (parsing,
                                   framing, rules, config), no servers started,
                                   no root, apt or browser; under a minute
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
# System programs the test suite drives, by the Debian package that brings them.
TEST_PROGRAMS = {"curl": "curl", "redis-server": "redis-server", "chromium": "chromium",
                 "pebble": "pebble", "pebble-challtestsrv": "pebble", "systemd-analyze": "systemd",
                 "named": "bind9"}


def say(message: str) -> None:
    print(f"[dev] {message}", flush=True)


def ensure_venv(extras: str = "") -> None:
    if not (BIN / "python").exists():
        say(f"creating {VENV.relative_to(ROOT)}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    say(f"installing rproxy{extras} into {VENV.relative_to(ROOT)}")
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "-e", f".{extras}"], cwd=ROOT, check=True)


def ensure_programs(programs: dict[str, str]) -> None:
    missing = sorted({pkg for prog, pkg in programs.items() if shutil.which(prog) is None})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        say(f"missing {', '.join(missing)}: install them (Debian packages) and run again")
        sys.exit(1)
    say(f"installing {', '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def run() -> int:
    ensure_venv()
    demo = subprocess.Popen([str(BIN / "python"), str(ROOT / "scripts" / "demo_upstream.py")], cwd=ROOT)
    say("rproxy on http://127.0.0.1:8080/ -> demo upstream on :8081; try: curl -i localhost:8080/")
    proxy = subprocess.Popen([str(BIN / "gunicorn"), "-c", "gunicorn.conf.py"], cwd=ROOT)
    try:
        return proxy.wait()
    except KeyboardInterrupt:
        proxy.send_signal(signal.SIGINT)
        return proxy.wait()
    finally:
        demo.terminate()
        demo.wait()


# The process tests wait on sockets, timers and process start-up rather than
# on the CPU, so a few pytest-xdist workers share 2 cores well. Whole files go
# to one worker (module-scoped fixtures are built once, a file's tests run in
# order). The fast tier is CPU-bound and in-process: it runs in one.
TEST_WORKERS = 3


def parallel(pytest_args: list[str]) -> list[str]:
    """pytest-xdist's flags, unless the arguments choose otherwise (-n, -p no:xdist)."""
    chosen = any(arg in ("-n", "--numprocesses", "no:xdist") or arg.startswith(("-n", "--numprocesses="))
                 for arg in pytest_args)
    return [] if chosen else ["-n", str(TEST_WORKERS), "--dist", "loadfile"]


def test(pytest_args: list[str]) -> int:
    ensure_venv("[test]")
    if "--quick" in pytest_args:
        pytest_args = [arg for arg in pytest_args if arg != "--quick"] + ["-m", "not process"]
    else:
        ensure_programs(TEST_PROGRAMS)
        pytest_args = parallel(pytest_args) + pytest_args
    code = subprocess.call([str(BIN / "python"), "-m", "pytest", *pytest_args], cwd=ROOT)
    if code == 5:
        say("pytest collected no tests: that is a failure here, not a pass")
        return 1
    return code


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "test"):
        print(__doc__)
        return 2
    return run() if argv[0] == "run" else test(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
