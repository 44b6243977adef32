"""Several rproxy instances on one host, each started the documented way with
the default pidfile and control socket: reloading or stopping one never
touches another, and a second start of the same config is refused."""

import json
import os
import subprocess
import time

import requests
from conftest import BIN, GUNICORN, Process, free_port, single_route, status_of, wait_for_port, wait_until

RPROXY = str(BIN / "rproxy")


def rproxy(*args, timeout=60):
    return subprocess.run([RPROXY, *args], capture_output=True, text=True, timeout=timeout)


class Instance(Process):
    """`RPROXY_CONFIG=INI gunicorn -c python:rproxy.gunicorn_conf` in a folder of its own."""

    def __init__(self, folder, upstream_port, server_extra=""):
        folder.mkdir(exist_ok=True)
        self.server_extra = server_extra
        self.port = free_port()
        self.ini = folder / "rproxy.ini"
        self.write(single_route(upstream_port))
        env = {k: v for k, v in os.environ.items() if k != "RPROXY_CONFIG"}
        env["RPROXY_CONFIG"] = str(self.ini)
        super().__init__([GUNICORN, "-c", "python:rproxy.gunicorn_conf"],
                         folder / f"gunicorn-{time.monotonic_ns()}.log", env=env, cwd=folder)
        self.url = f"http://127.0.0.1:{self.port}"

    def write(self, routes: str) -> None:
        self.ini.write_text(f"[server]\nbind = 127.0.0.1:{self.port}\n{self.server_extra}\n{routes}")

    def started(self):
        wait_for_port(self.port, self.proc)
        deadline = time.monotonic() + 15
        while "rproxy worker" not in self.log():
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)
        return self

    def files(self) -> dict:
        out = rproxy("check", str(self.ini))
        assert out.returncode == 0, out.stderr
        return dict(line.split(": ", 1) for line in out.stdout.splitlines()[1:])

    def control(self, command: str) -> dict:
        out = subprocess.run([str(BIN / "gunicornc"), "-s", self.files()["control socket"], "-c", command, "-j"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        return json.loads(out.stdout)

    def worker_pids(self) -> set:
        return {w.pid for w in self.children()}


def test_two_instances_reload_and_stop_apart(tmp_path, upstream):
    a = Instance(tmp_path / "a", upstream.port)
    b = Instance(tmp_path / "b", upstream.port)
    try:
        a.started(), b.started()
        files_a, files_b = a.files(), b.files()
        assert files_a["pidfile"] != files_b["pidfile"]
        assert files_a["control socket"] != files_b["control socket"]
        for instance, files in ((a, files_a), (b, files_b)):
            assert open(files["pidfile"]).read().strip() == str(instance.pid)
            # Each control socket reaches its own master.
            assert instance.control("show all")["arbiter"]["pid"] == instance.pid
        b_workers = b.worker_pids()

        # Reload A with a new route: only A changes.
        a.write(single_route(upstream.port) + "[route:v2]\npath = /v2\nupstream = app\nstrip_prefix = yes\n")
        out = rproxy("reload", str(a.ini))
        assert out.returncode == 0, out.stderr
        assert f"master pid {a.pid}" in out.stdout
        assert wait_until(lambda: "2 routes" in a.log())
        # Once the old worker has stopped accepting, /v2 is the new route's.
        assert wait_until(lambda: requests.get(a.url + "/v2/echo", timeout=10).json()["request_line"]
                          == "GET /echo HTTP/1.1")
        assert "Handling signal: hup" not in b.log()
        assert b.worker_pids() == b_workers

        # Stop A: B goes on serving, its pidfile and control socket in place.
        out = rproxy("stop", str(a.ini))
        assert out.returncode == 0, out.stderr
        assert a.proc.wait(10) == 0
        assert not os.path.exists(files_a["pidfile"]) and not os.path.exists(files_a["control socket"])
        assert status_of(b.url + "/echo") == 200
        assert b.control("show all")["arbiter"]["pid"] == b.pid
        assert "Handling signal" not in b.log()
        assert "Traceback" not in a.log() + b.log()
    finally:
        a.stop()
        b.stop()


def test_second_start_of_one_config_is_refused_and_leaves_the_first_alone(tmp_path, upstream):
    first = Instance(tmp_path / "one", upstream.port)
    try:
        first.started()
        files = first.files()
        # Same INI, another port: gunicorn's flags override the bind, not the instance's files.
        env = dict(os.environ, RPROXY_CONFIG=str(first.ini))
        second = subprocess.run([GUNICORN, "-c", "python:rproxy.gunicorn_conf", "-b", f"127.0.0.1:{free_port()}"],
                                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
        assert second.returncode != 0
        assert f"Already running on PID {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert open(files["pidfile"]).read().strip() == str(first.pid)
        assert first.control("show all")["arbiter"]["pid"] == first.pid
        assert status_of(first.url + "/echo") == 200
    finally:
        first.stop()


def test_reload_of_a_broken_config_is_refused_before_signalling(tmp_path, upstream):
    instance = Instance(tmp_path / "broken", upstream.port)
    try:
        instance.started()
        workers = instance.worker_pids()
        instance.write(single_route(upstream.port) + "[route:bad]\nupstream = nowhere\n")
        out = rproxy("reload", str(instance.ini))
        assert out.returncode == 1
        assert out.stderr.splitlines() == [
            f"rproxy: {instance.ini}: [route:bad] upstream: no [upstream:nowhere] section",
            "rproxy: not reloaded; the running instance keeps the config it has"]
        assert "Handling signal: hup" not in instance.log()
        assert instance.worker_pids() == workers and status_of(instance.url + "/echo") == 200
    finally:
        instance.stop()


def test_reload_and_stop_without_a_running_instance_say_so(tmp_path):
    ini = tmp_path / "idle.ini"
    ini.write_text(single_route(9))
    for command in ("reload", "stop"):
        out = rproxy(command, str(ini))
        assert out.returncode == 1
        assert out.stderr.startswith(f"rproxy: {ini}: [server] pidfile: no rproxy is running with this config")


def test_configured_pidfile_and_control_socket_are_used(tmp_path, upstream):
    pidfile, socket_path = tmp_path / "configured" / "my.pid", tmp_path / "configured" / "my.ctl"
    instance = Instance(tmp_path / "configured", upstream.port,
                        f"pidfile = {pidfile}\ncontrol_socket = {socket_path}\n")
    try:
        instance.started()
        assert instance.files() == {"pidfile": str(pidfile), "control socket": str(socket_path)}
        assert pidfile.read_text().strip() == str(instance.pid)
        assert instance.control("show all")["arbiter"]["pid"] == instance.pid
        assert rproxy("stop", str(instance.ini)).returncode == 0
        assert instance.proc.wait(10) == 0
        assert not pidfile.exists()
    finally:
        instance.stop()


def test_pidfile_in_a_missing_folder_stops_the_start_in_one_line(tmp_path):
    ini = tmp_path / "rproxy.ini"
    ini.write_text(f"[server]\nbind = 127.0.0.1:{free_port()}\npidfile = {tmp_path}/nowhere/x.pid\n\n"
                   + single_route(9))
    out = subprocess.run([GUNICORN, "-c", "python:rproxy.gunicorn_conf"], capture_output=True, text=True,
                         env=dict(os.environ, RPROXY_CONFIG=str(ini)), cwd=tmp_path, timeout=60)
    assert out.returncode != 0
    assert out.stderr.strip() == f"rproxy: {ini}: [server] pidfile: the folder of '{tmp_path}/nowhere/x.pid' does not exist"
