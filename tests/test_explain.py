"""`rproxy explain` tells which route, chain, upstream and server a request gets, and why."""

import subprocess

from conftest import BIN

RPROXY = str(BIN / "rproxy")

CONFIG = """
[upstream:web]
servers = 10.0.0.1:80 10.0.0.2:80 weight=3
[upstream:api]
servers = 10.0.1.1:9000 10.0.1.2:9000 10.0.1.3:9000
balance = hash
hash_key = header:X-User
read_timeout = 5s
[route:web]
host = *.example.com
upstream = web
[route:api]
host = www.example.com
path = /api
upstream = api
strip_prefix = yes
upgrade = websocket
"""


def explain(tmp_path, *args):
    path = tmp_path / "rproxy.ini"
    path.write_text(CONFIG)
    out = subprocess.run([RPROXY, "explain", str(path), *args], capture_output=True, text=True, timeout=30)
    return out.returncode, out.stdout + out.stderr


def test_explains_route_prefix_upstream_and_server(tmp_path):
    code, text = explain(tmp_path, "http://www.example.com/api//users/../orders?x=1", "-H", "X-User: alice")
    assert code == 0
    assert "route        api" in text
    assert "host www.example.com matches www.example.com" in text
    assert "path prefix /api (longest of /api, /)" in text
    assert "canonical  /api//users/../orders?x=1 -> /api/orders?x=1" in text
    assert "forwards   GET /orders?x=1  (strip_prefix)" in text
    assert "balance = hash" in text and "consistent hash of header:X-User = 'alice'" in text
    # The same key always names the same server.
    server = next(l for l in text.splitlines() if l.strip().startswith("server"))
    assert server == next(l for l in explain(tmp_path, "http://www.example.com/api/x", "-H", "X-User: alice")[1]
                          .splitlines() if l.strip().startswith("server"))
    assert "read 5s" in text


def test_explains_wildcard_hosts_and_upgrades(tmp_path):
    code, text = explain(tmp_path, "http://shop.example.com/cart", "-H", "Connection: Upgrade",
                         "-H", "Upgrade: websocket")
    assert code == 0 and "route        web" in text
    assert "host shop.example.com matches *.example.com" in text
    assert "upgrade    websocket: tunnelled" in text


def test_explains_the_proxys_own_answers(tmp_path):
    code, text = explain(tmp_path, "http://other.org/")
    assert code == 1 and "404: no route for host other.org" in text
    code, text = explain(tmp_path, "http://www.example.com/../etc/passwd")
    assert code == 1 and "400" in text
