"""One running rproxy and its own files: the pidfile and gunicorn's control
socket, by default named after the config file's real path, so that
instances on one host (or of one user) never share them; and signalling the
instance that serves a config (`rproxy reload`, `rproxy stop`).

gunicorn's own default control socket is one per user ($HOME/.gunicorn or
$XDG_RUNTIME_DIR): every instance started by that user would take it over, or
delete it when it stops.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import signal
import stat
import time

from rproxy.config import Config, ConfigError

ROOT_RUN_DIR = "/run/rproxy"


def run_dir() -> str:
    """Where instances keep their files: /run/rproxy for root, else a folder
    of this user's own in /tmp (the same whatever the environment, so that
    `rproxy reload` from cron or sudo finds what a shell started)."""
    uid = os.geteuid()
    return ROOT_RUN_DIR if uid == 0 else f"/tmp/rproxy-{uid}"


def instance_name(config_path: str) -> str:
    """'rproxy-1a2b3c4d5e' for /etc/rproxy.ini: the file's name, readable,
    and a digest of its real path, unique per config file."""
    real = os.path.realpath(config_path)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.splitext(os.path.basename(real))[0])[:40]
    return f"{stem}-{hashlib.sha256(real.encode()).hexdigest()[:10]}"


def pidfile(config: Config) -> str:
    return config.server.pidfile or os.path.join(run_dir(), instance_name(config.path) + ".pid")


def control_socket(config: Config) -> str | None:
    """gunicorn's control socket for this instance (`gunicornc -s PATH`), or None when off."""
    configured = config.server.control_socket
    if configured == "off":
        return None
    return configured or os.path.join(run_dir(), instance_name(config.path) + ".ctl")


def prepare(config: Config) -> None:
    """In the master, at start: the default run folder exists, is ours and
    closed to others (it sits in /tmp for users other than root)."""
    if config.server.pidfile and not os.path.isdir(os.path.dirname(os.path.abspath(config.server.pidfile))):
        raise ConfigError(config.path, "server", "pidfile",
                          f"the folder of {config.server.pidfile!r} does not exist")
    wanted = [pidfile(config), control_socket(config) or ""]
    if not any(os.path.dirname(p) == run_dir() for p in wanted):
        return
    directory = run_dir()
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    except OSError as e:
        raise ConfigError(config.path, "server", "pidfile",
                          f"cannot create the run folder {directory!r}: {e.strerror or e}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise ConfigError(config.path, "server", "pidfile",
                          f"the run folder {directory!r} is not a folder of this user's that only it may "
                          "write to: set pidfile and control_socket to paths of your own")


def running_pid(config: Config) -> int:
    """The pid of the master serving `config`, from its pidfile; ConfigError
    (naming the pidfile) when none runs."""
    path = pidfile(config)
    try:
        with open(path, encoding="ascii") as f:
            pid = int(f.read().strip() or 0)
    except FileNotFoundError:
        raise ConfigError(config.path, "server", "pidfile",
                          f"no rproxy is running with this config (no {path})") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ConfigError(config.path, "server", "pidfile", f"cannot read a pid from {path}: {e}") from None
    if pid <= 0 or not _alive(pid):
        raise ConfigError(config.path, "server", "pidfile",
                          f"no rproxy is running with this config ({path} names pid {pid}, which is gone)")
    return pid


def signal_instance(config: Config, signum: int) -> int:
    pid = running_pid(config)
    os.kill(pid, signum)
    return pid


def stop(config: Config, timeout: float) -> int:
    """TERM to the master (graceful stop), then wait for it to be gone."""
    pid = signal_instance(config, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {pid} still running after {timeout:g}s")
        time.sleep(0.05)
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    # A zombie (an exited child not yet reaped by its parent) is gone for us.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def control_socket_settings(config: Config) -> dict:
    """gunicorn's settings for it: a path of this instance's, or none."""
    path = control_socket(config)
    return {"control_socket_disable": True} if path is None else {"control_socket": path}
