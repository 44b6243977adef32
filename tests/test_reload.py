"""`kill -HUP` reloads the INI with no request lost, and a broken INI is refused."""

import hashlib
import os
import signal
import subprocess
import threading
import time

import requests

from conftest import BIN, single_route
from upstream import pattern_bytes


def wait_until(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def status_of(url):
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return None


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
