"""Metrics across workers, the status page, JSON logs and Server-Timing."""

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from conftest import REPO, free_port, single_route


def admin_ini(upstream_port, admin_port, extra=""):
    return single_route(upstream_port) + f"\n[admin]\nbind = 127.0.0.1:{admin_port}\n" + extra


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(admin_port) -> str:
    r = requests.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


def test_metrics_count_every_worker(start_proxy, upstream):
    admin = free_port()
    proxy = start_proxy(admin_ini(upstream.port, admin, "[rate_limit:tight]\nlimit = 2/minute\n"
                                                         "[cache]\n[route:tight]\npath = /echo/tight\n"
                                                         "upstream = app\nrate_limit = tight\n"),
                        workers=2)
    for _ in range(30):
        assert requests.get(proxy.url + "/echo", timeout=10).status_code == 200
    for _ in range(4):
        requests.get(proxy.url + "/echo/tight", timeout=10)
    requests.get(proxy.url + "/cacheable?cc=max-age=60&id=metrics", timeout=10)
    requests.get(proxy.url + "/cacheable?cc=max-age=60&id=metrics", timeout=10)
    # A request is counted once its last byte is out: let the workers finish counting.
    deadline = time.monotonic() + 5
    while metric(scrape(admin), "rproxy_requests_total") < 36 and time.monotonic() < deadline:
        time.sleep(0.05)
    text = scrape(admin)
    assert metric(text, "rproxy_requests_total", route="default", status="2xx") == 32
    # Memory limits count per worker: how many of the 4 were refused depends on where they landed.
    allowed = metric(text, "rproxy_requests_total", route="tight", status="2xx")
    refused = metric(text, "rproxy_requests_total", route="tight", status="4xx")
    assert allowed + refused == 4 and refused >= 0
    assert metric(text, "rproxy_rate_limited_total", limit="tight") == refused
    # Every GET let through asks the cache; each worker has its own.
    hits = metric(text, "rproxy_cache_responses_total", result="HIT")
    assert hits + metric(text, "rproxy_cache_responses_total", result="MISS") == 32 + allowed
    assert metric(text, "rproxy_requests_total", route="default", upstream="app", status="2xx") == 32 - hits
    assert (metric(text, "rproxy_cache_hit_bytes_total") > 0) == (hits == 1)
    assert metric(text, "rproxy_request_duration_seconds_count", route="default") == 32
    assert metric(text, "rproxy_upstream_duration_seconds_count", upstream="app") >= 32
    assert metric(text, "rproxy_requests_in_flight") == 0
    assert metric(text, "rproxy_upstream_server_up", upstream="app", server=f"127.0.0.1:{upstream.port}") == 1


def test_admin_pages_are_not_reachable_through_a_route(start_proxy, upstream):
    admin = free_port()
    proxy = start_proxy(admin_ini(upstream.port, admin))
    r = requests.get(proxy.url + "/metrics", timeout=10)
    assert "rproxy_requests_total" not in r.text  # the upstream's answer, not ours
    assert "Host" not in requests.get(f"http://127.0.0.1:{admin}/echo", timeout=10).text
    assert requests.get(f"http://127.0.0.1:{admin}/echo", timeout=10).status_code == 404
    assert requests.get(f"http://127.0.0.1:{admin}/status", timeout=10).headers["Content-Type"].startswith("text/html")


def test_a_dead_workers_live_gauges_stop_counting(start_proxy, upstream):
    admin = free_port()
    proxy = start_proxy(admin_ini(upstream.port, admin), workers=2)
    def held_request():
        try:
            requests.get(proxy.url + "/slow?delay=3", timeout=10)
        except requests.RequestException:
            pass  # its worker is killed under it: that is the point
    hold = threading.Thread(target=held_request)
    hold.start()
    deadline = time.monotonic() + 5
    while metric(scrape(admin), "rproxy_requests_in_flight") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(scrape(admin), "rproxy_requests_in_flight") == 1

    def busy_workers():
        return [w for w in proxy.workers() if any(c.status == "ESTABLISHED" and c.raddr and
                                                 c.raddr.port == upstream.port for c in w.net_connections())]
    deadline = time.monotonic() + 5  # counted on arrival; connected upstream a moment later
    while not busy_workers() and time.monotonic() < deadline:
        time.sleep(0.05)
    busy = busy_workers()
    assert len(busy) == 1
    os.kill(busy[0].pid, signal.SIGKILL)
    hold.join()
    deadline = time.monotonic() + 5
    while metric(scrape(admin), "rproxy_requests_in_flight") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(scrape(admin), "rproxy_requests_in_flight") == 0


def test_json_access_log(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port) + "\n[cache]\n")
    proxy.ini_path.write_text(proxy.ini_path.read_text().replace("[log]\n", "[log]\nformat = json\n"))
    os.kill(proxy.pid, signal.SIGHUP)
    # Until the old worker has stopped accepting, a request may still meet it.
    deadline, line, attempt = time.monotonic() + 15, None, 0
    while line is None and time.monotonic() < deadline:
        attempt += 1
        rid = f"json-{attempt}"
        requests.get(proxy.url + "/echo/json?x=1", headers={"X-Request-ID": rid}, timeout=10)
        time.sleep(0.2)
        line = next((l for l in proxy.log().splitlines() if f'"request_id":"{rid}"' in l), None)
    assert line is not None, "no JSON access line after the reload"
    record = json.loads(line)
    assert record["method"] == "GET" and record["path"] == "/echo/json?x=1" and record["status"] == 200
    assert record["upstream"] == f"127.0.0.1:{upstream.port}" and record["upstream_ms"] > 0
    assert record["total_ms"] >= record["upstream_ms"] and record["bytes"] > 0
    assert record["client"] == "127.0.0.1" and record["cache"] == "MISS" and record["route"] == "default"


def test_gunicorn_access_log_format_names_the_proxy_facts(start_proxy, upstream):
    fmt = ("gfmt %(s)s up=%({rproxy.upstream}e)s name=%({rproxy.upstream_name}e)s "
           "ms=%({rproxy.upstream_ms}e)s route=%({rproxy.route}e)s rid=%({rproxy.request_id}e)s "
           "cache=%({rproxy.cache}e)s err=%({rproxy.error}e)s")
    proxy = start_proxy(single_route(upstream.port) + "\n[cache]\n", args=("--access-logformat", fmt))
    requests.get(proxy.url + "/echo/fmt", headers={"X-Request-ID": "fmt-1"}, timeout=10)
    served, = proxy.wait_for_log(r"gfmt .*rid=fmt-1")
    assert re.search(rf"gfmt 200 up=127\.0\.0\.1:{upstream.port} name=app ms=[\d.]+ route=default "
                     r"rid=fmt-1 cache=MISS err=-$", served), served


def test_server_timing_when_the_route_asks(start_proxy, upstream):
    proxy = start_proxy(single_route(upstream.port, route_extra="server_timing = yes") + "\n[cache]\n")
    r = requests.get(proxy.url + "/slow?delay=0.2", timeout=10)
    timing = r.headers["Server-Timing"]
    upstream_ms = float(re.search(r"upstream;dur=([\d.]+)", timing).group(1))
    assert upstream_ms >= 200
    assert re.search(r"proxy;dur=[\d.]+", timing) and re.search(r'cache;desc="MISS";dur=[\d.]+', timing)


def test_status_page_in_a_real_browser(start_proxy, upstream, tmp_path):
    from browser import Chromium
    admin = free_port()
    proxy = start_proxy(admin_ini(upstream.port, admin))
    requests.get(proxy.url + "/echo", timeout=10)
    with Chromium(tmp_path) as browser:
        page = browser.open(f"http://127.0.0.1:{admin}/status")
        page.wait_for("document.getElementById('total-requests').textContent !== '-'")
        page.wait_for("document.getElementById('mode').textContent === 'live'")
        before = int(page.evaluate("document.getElementById('total-requests').textContent"))
        for _ in range(25):
            requests.get(proxy.url + "/echo", timeout=10)
        page.wait_for(f"Number(document.getElementById('total-requests').textContent) >= {before + 25}")
        page.wait_for("document.querySelector('#routes tr canvas') !== null")
        rate = page.evaluate("document.querySelector('#routes tr td:nth-child(2)').textContent")
        health = page.evaluate("document.querySelector('#servers tr td:nth-child(3)').textContent")
        artifacts = REPO / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        page.screenshot(artifacts / "status-page.png")
        assert page.errors == []
    assert float(rate) >= 0 and health == "up"
    assert (artifacts / "status-page.png").stat().st_size > 5000


TOTAL = "Number(document.getElementById('total-requests').textContent)"
MODE = "document.getElementById('mode')"


def test_status_page_live_over_websocket_then_polling_when_the_socket_drops(start_proxy, upstream, tmp_path):
    from browser import Chromium
    admin = free_port()
    proxy = start_proxy(admin_ini(upstream.port, admin))
    with Chromium(tmp_path) as browser:
        page = browser.open(f"http://127.0.0.1:{admin}/status")
        page.wait_for(f"{MODE}.textContent === 'live' && Number({MODE}.dataset.pushes) >= 2")
        before = page.evaluate(TOTAL)
        for _ in range(10):
            requests.get(proxy.url + "/echo", timeout=10)
        page.wait_for(f"{TOTAL} >= {before + 10}")
        # Those numbers came over the socket: the page has not polled once.
        assert page.evaluate(f"{MODE}.dataset.polls") is None
        assert page.errors == []
        # The worker holding the socket dies; the master starts another.
        os.kill(proxy.workers()[0].pid, signal.SIGKILL)
        page.wait_for(f"{MODE}.textContent === 'polling every 2 s'")
        deadline = time.monotonic() + 15
        served = 0
        while served < 10 and time.monotonic() < deadline:
            try:
                served += requests.get(proxy.url + "/echo", timeout=10).status_code == 200
            except requests.ConnectionError:
                time.sleep(0.1)  # between the two workers
        assert served == 10
        page.wait_for(f"Number({MODE}.dataset.polls) >= 1 && {TOTAL} >= {before + 20}")
        artifacts = REPO / "test-artifacts"
        artifacts.mkdir(exist_ok=True)
        page.screenshot(artifacts / "status-page-polling.png")
        # Later the socket is tried again, and the page is live once more.
        page.wait_for(f"{MODE}.textContent === 'live'", timeout=40)
        pushes = page.evaluate(f"Number({MODE}.dataset.pushes)")
        page.wait_for(f"Number({MODE}.dataset.pushes) > {pushes}")


ACCESS_LINE = re.compile(r'^127\.0\.0\.1 - - \[[^\]]+\] "GET /echo/(\w+) HTTP/1\.1" 200 \d+ "-" "[^"]*" '
                         r'[\d.]+ms upstream=127\.0\.0\.1:\d+ upstream_ms=[\d.]+ route=default rid=(\w+)$')


def test_access_lines_whole_and_prompt_under_load(start_proxy, upstream):
    """Access lines are written once per turn of a worker's event loop, for
    every request that ended in it: under concurrent load across two workers
    sharing one log, each request still gets exactly one whole line, without
    waiting for more traffic, and the last ones are there after a stop."""
    proxy = start_proxy(single_route(upstream.port), workers=2)
    ids = [f"r{i:04d}" for i in range(400)]
    with ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(lambda rid: requests.get(f"{proxy.url}/echo/{rid}", timeout=10,
                                                          headers={"X-Request-ID": rid}).status_code, ids))
    assert statuses == [200] * len(ids)
    lines = proxy.wait_for_log(r"rid=r\d{4}$", count=len(ids), timeout=10)
    parsed = [ACCESS_LINE.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed) if not m][:3]
    assert sorted(m.group(2) for m in parsed) == ids
    assert all(m.group(1) == m.group(2) for m in parsed)
    # One more request on an otherwise idle proxy: its line comes at once.
    requests.get(f"{proxy.url}/echo/last", headers={"X-Request-ID": "last"}, timeout=10)
    proxy.wait_for_log(r"rid=last$", timeout=2)
    requests.get(f"{proxy.url}/echo/stop", headers={"X-Request-ID": "stop"}, timeout=10)
    proxy.stop()
    assert proxy.log_lines(r"rid=stop$")
