"""`kill -HUP` reloads the INI with no request lost, and a broken INI is refused."""

import hashlib
import os
import random
import re
import signal
import subprocess
import threading
import time

import psutil
import pytest
import requests
from conftest import (
    BIN,
    GUNICORN,
    REPO,
    Process,
    Proxy,
    Started,
    free_port,
    single_route,
    status_of,
    stop_all_without_tracebacks,
    wait_for_port,
    wait_until,
)
from upstream import pattern_bytes


def versioned_ini(port, version):
    return single_route(port) + (f"\n[route:v{version}]\npath = /v{version}\nupstream = app\n"
                                 f"strip_prefix = yes\n")


def test_hup_loads_new_routes(start_proxy, upstream):
    proxy = start_proxy(versioned_ini(upstream.port, 1))
    assert status_of(proxy.url + "/v1/echo") == 200
    proxy.rewrite(versioned_ini(upstream.port, 2))
    os.kill(proxy.pid, signal.SIGHUP)
    assert wait_until(lambda: status_of(proxy.url + "/v2/echo") == 200)
    # Once the old worker has stopped accepting, /v1 is the default route's.
    assert wait_until(lambda: requests.get(proxy.url + "/v1/echo", timeout=5).json()["request_line"]
                      == "GET /v1/echo HTTP/1.1")


def test_reload_through_the_gunicorn_control_socket(start_proxy, upstream, tmp_path):
    control = str(tmp_path / "gunicorn.ctl")
    proxy = start_proxy(versioned_ini(upstream.port, 1), control_socket=control)
    proxy.rewrite(versioned_ini(upstream.port, 2))
    out = subprocess.run([str(BIN / "gunicornc"), "-s", control, "-c", "reload"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert wait_until(lambda: status_of(proxy.url + "/v2/echo") == 200)


def test_hup_with_a_broken_config_keeps_serving_the_old_one(start_proxy, upstream):
    proxy = start_proxy(versioned_ini(upstream.port, 1))
    proxy.rewrite(versioned_ini(upstream.port, 1) + "\n[route:broken]\nupstream = nowhere\n")
    os.kill(proxy.pid, signal.SIGHUP)
    assert wait_until(lambda: "reload refused" in proxy.log())
    assert "[route:broken] upstream: no [upstream:nowhere] section" in proxy.log()
    time.sleep(1.0)
    assert proxy.proc.poll() is None
    for _ in range(10):
        assert status_of(proxy.url + "/v1/echo") == 200
    # Fixed, the next reload applies.
    proxy.rewrite(versioned_ini(upstream.port, 3))
    os.kill(proxy.pid, signal.SIGHUP)
    assert wait_until(lambda: status_of(proxy.url + "/v3/echo") == 200)


def test_five_reloads_under_load_lose_no_request(start_proxy, upstream):
    proxy = start_proxy(versioned_ini(upstream.port, 0), workers=2)
    stop = threading.Event()
    failures, done = [], [0]

    def load():
        while not stop.is_set():
            try:
                r = requests.get(proxy.url + "/echo", timeout=15)
                if r.status_code != 200:
                    failures.append(r.status_code)
            except requests.RequestException as e:
                failures.append(repr(e))
            done[0] += 1

    size = 200 << 20
    download = {}

    def long_download():
        digest, total = hashlib.sha256(), 0
        with requests.get(proxy.url + f"/bytes?n={size}", stream=True, timeout=30) as r:
            for piece in r.iter_content(1 << 20):
                digest.update(piece)
                total += len(piece)
                time.sleep(0.02)  # a slow client: it spans the reloads
        download.update(total=total, sha=digest.hexdigest())

    threads = [threading.Thread(target=load) for _ in range(4)]
    downloader = threading.Thread(target=long_download)
    for t in threads:
        t.start()
    downloader.start()
    time.sleep(0.5)
    for version in range(1, 6):
        proxy.rewrite(versioned_ini(upstream.port, version))
        os.kill(proxy.pid, signal.SIGHUP)
        assert wait_until(lambda: status_of(proxy.url + f"/v{version}/echo") == 200), version
        time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(20)
    downloader.join(60)
    assert failures == []
    assert done[0] > 100
    expected = hashlib.sha256()
    for piece in pattern_bytes(size):
        expected.update(piece)
    assert download == {"total": size, "sha": expected.hexdigest()}


def running(pids):
    """Those of `pids` that are still processes (not zombies waiting for their parent)."""
    alive = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.add(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


class StartingProxy(Proxy):
    """rproxy as start_proxy runs it (two workers here), handed back as soon
    as gunicorn is spawned: the test signals it while it starts."""

    def __init__(self, tmp_dir, ini, workers=2, conf="gunicorn.conf.py"):
        self.port = free_port()
        self.head = (f"[server]\nbind = 127.0.0.1:{self.port}\nworkers = {workers}\n\n"
                     "[log]\nlevel = debug\n\n")
        self.ini_path = tmp_dir / f"rproxy-{self.port}.ini"
        self.rewrite(ini)
        Process.__init__(self, [GUNICORN, "-c", conf, "--no-control-socket"], tmp_dir / f"proxy-{self.port}.log",
                         env=dict(os.environ, RPROXY_CONFIG=str(self.ini_path)))
        self.url = f"http://127.0.0.1:{self.port}"

    def accepts(self):
        wait_for_port(self.port, self.proc)

    def masters(self):
        """Pids of the masters that logged their start here (USR2 starts a second one)."""
        return [int(pid) for pid in re.findall(r"\[(\d+)\] \[INFO\] Starting gunicorn", self.log())]

    def booted(self):
        """Pids of every worker booted so far, by any of the masters."""
        return {int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", self.log())}

    def workers_of(self, master):
        """Pids of the worker processes of `master`: its children but a master
        it started by USR2 (and zombies waiting for it)."""
        try:
            kids = psutil.Process(master).children()
        except psutil.NoSuchProcess:
            return set()
        return running({kid.pid for kid in kids}) - set(self.masters())

    def routes_of_workers(self):
        """{pid: routes in its config} of each worker that said it was ready."""
        return {int(pid): int(routes) for pid, routes in
                re.findall(r"rproxy worker (\d+) ready: (\d+) routes", self.log())}

    def settled(self, master, workers, routes):
        """Master `master` has exactly `workers` worker processes, each ready
        with the config of `routes` routes."""
        pids = self.workers_of(master)
        ready = self.routes_of_workers()
        return len(pids) == workers and all(ready.get(pid) == routes for pid in pids)


@pytest.fixture
def start_starting_proxy(tmp_path):
    started = Started(lambda ini, **kwargs: StartingProxy(tmp_path, ini, **kwargs))
    yield started.start
    stop_all_without_tracebacks(started)


def newer_ini(port):
    """versioned_ini(port, 2) and one more route: its workers say "3 routes",
    those of versioned_ini(port, 1) "2 routes"."""
    return versioned_ini(port, 2) + "\n[route:more]\npath = /more\nupstream = app\n"


def served_by_new_config_only(proxy, connections=10):
    """Each of `connections` new connections gets newer_ini's routes: /v2
    answers, and /v1 is the default route's (no worker has the old config)."""
    for _ in range(connections):
        if status_of(proxy.url + "/v2/echo") != 200:
            return False
        old = requests.get(proxy.url + "/v1/echo", timeout=5, headers={"Connection": "close"})
        if old.json()["request_line"] != "GET /v1/echo HTTP/1.1":
            return False
    return True


def test_hup_at_any_moment_of_start_up_ends_with_the_workers_on_the_new_config(start_starting_proxy, upstream,
                                                                               hardening_record):
    chance = random.Random(14)
    # Most in the first 0.3 s, while the workers are forked and boot (it varies with the machine).
    delays = [chance.uniform(0.0, 0.3) for _ in range(9)] + [chance.uniform(0.3, 1.2) for _ in range(3)]
    chance.shuffle(delays)
    started = time.monotonic()
    for delay in delays:
        proxy = start_starting_proxy(versioned_ini(upstream.port, 1))
        proxy.accepts()  # the master has its handlers from here on; its workers are still to come
        time.sleep(delay)
        proxy.rewrite(newer_ini(upstream.port))
        os.kill(proxy.pid, signal.SIGHUP)
        assert wait_until(lambda: proxy.settled(proxy.pid, 2, routes=3), timeout=10), \
            (delay, proxy.routes_of_workers(), proxy.workers_of(proxy.pid), proxy.log()[-3000:])
        assert served_by_new_config_only(proxy), delay
        proxy.stop(signal.SIGKILL)
    hardening_record(("HUP at a random moment of start-up, 0-1.2 s after the port accepts (workers = 2)",
                      str(len(delays)), "each time exactly 2 workers after, both on the new config; "
                      f"{time.monotonic() - started:.0f} s in all"))


def test_hup_before_the_master_has_its_signal_handlers_reloads_once_it_has(start_starting_proxy, upstream):
    proxy = start_starting_proxy(versioned_ini(upstream.port, 1),
                                 conf=str(REPO / "tests" / "slow_start_gunicorn_conf.py"))
    proxy.wait_for_log(r"Starting gunicorn")  # its config read, gunicorn's handlers a second away
    proxy.rewrite(newer_ini(upstream.port))
    os.kill(proxy.pid, signal.SIGHUP)
    assert wait_until(lambda: proxy.settled(proxy.pid, 2, routes=3), timeout=15), proxy.log()[-3000:]
    assert served_by_new_config_only(proxy)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGQUIT, signal.SIGINT], ids=lambda s: s.name)
def test_stop_at_any_moment_of_start_up_leaves_no_process(start_starting_proxy, upstream, stop):
    chance = random.Random(int(stop))
    for delay in [chance.uniform(0.0, 0.6) for _ in range(4)]:
        proxy = start_starting_proxy(versioned_ini(upstream.port, 1))
        proxy.accepts()
        time.sleep(delay)
        proxy.proc.send_signal(stop)
        # gunicorn stops at once (QUIT, INT) or once requests are done (TERM: none here);
        # it waits graceful_timeout (30 s) only for a worker that missed the signal.
        assert wait_until(lambda: proxy.proc.poll() is not None, timeout=10), (delay, proxy.log()[-3000:])
        assert wait_until(lambda: not running(proxy.booted()), timeout=5), (delay, proxy.log()[-3000:])


def test_usr2_at_any_moment_of_start_up_gives_a_new_master_with_its_workers_on_the_new_config(
        start_starting_proxy, upstream):
    chance = random.Random(2)
    for delay in [chance.uniform(0.0, 1.0) for _ in range(3)]:
        proxy = start_starting_proxy(versioned_ini(upstream.port, 1))
        proxy.accepts()
        time.sleep(delay)
        proxy.rewrite(newer_ini(upstream.port))
        os.kill(proxy.pid, signal.SIGUSR2)

        def upgraded():
            new = [pid for pid in proxy.masters() if pid != proxy.pid]
            return (len(new) == 1 and proxy.settled(new[0], 2, routes=3)
                    and proxy.settled(proxy.pid, 2, routes=2))

        # gunicorn's upgrade: the old master keeps its workers (on the config it had)
        # until told to stop; the new one starts its own, on the config now in the file.
        assert wait_until(upgraded, timeout=15), (delay, proxy.log()[-3000:])
        proxy.stop(signal.SIGKILL)  # and all it started, the new master too
