"""https:// upstreams: verified by default, by name (SNI), with a client
certificate when the upstream asks, and a clear 502 when verification fails."""

import re
import subprocess
import time

import pytest
import requests
from conftest import BIN, Certificates


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory):
    """A CA the proxy is never told about."""
    made = Certificates(tmp_path_factory.mktemp("other-ca"))
    made.cert, made.key = made.issue("server")
    return made


def tls_route(upstream, extra=""):
    return (f"[upstream:app]\nservers = https://127.0.0.1:{upstream.port}\n{extra}\n"
            f"[route:default]\nupstream = app\n")


def test_https_upstream_verified_with_ca_file(start_proxy, start_upstream, certs):
    upstream = start_upstream(tls={"certfile": certs.cert, "keyfile": certs.key})
    proxy = start_proxy(tls_route(upstream, f"ca_file = {certs.ca_file}"))
    r = requests.get(proxy.url + "/echo", timeout=10)
    assert r.status_code == 200
    assert r.json()["request_line"] == "GET /echo HTTP/1.1"
    # Kept alive: a second request reuses the TLS connection.
    requests.get(proxy.url + "/echo", timeout=10)
    assert upstream.stats()["connections"] == 2  # ours, and stats' own


def test_verification_is_on_by_default_against_the_system_cas(start_proxy, start_upstream, certs):
    # The test CA is in no system store: the default must refuse it.
    upstream = start_upstream(tls={"certfile": certs.cert, "keyfile": certs.key})
    proxy = start_proxy(tls_route(upstream))
    r = requests.get(proxy.url + "/echo", timeout=10)
    assert r.status_code == 502
    assert "TLS verification of the upstream failed" in r.text
    assert "certificate verify failed" in r.text or "unable to get local issuer" in r.text
    assert re.search(r"upstream 127\.0\.0\.1:\d+ \(GET /echo\): TLS verification of the upstream failed",
                     proxy.log())
    assert upstream.stats()["requests"] == 1  # this one: the proxy's never got through


def test_certificate_from_another_ca_gets_502_saying_tls_verification_failed(
        start_proxy, start_upstream, certs, other_ca):
    upstream = start_upstream(tls={"certfile": other_ca.cert, "keyfile": other_ca.key})
    proxy = start_proxy(tls_route(upstream, f"ca_file = {certs.ca_file}"))
    r = requests.get(proxy.url + "/echo", headers={"Accept": "application/json"}, timeout=10)
    assert r.status_code == 502
    assert r.json()["error"].startswith("TLS verification of the upstream failed")


def test_name_is_checked_against_the_certificate(start_proxy, start_upstream, certs, tmp_path):
    cert, key = certs.issue("only-api", "api.internal.test")
    upstream = start_upstream(tls={"certfile": cert, "keyfile": key})
    # By IP, the certificate (for api.internal.test only) does not match.
    proxy = start_proxy(tls_route(upstream, f"ca_file = {certs.ca_file}"))
    r = requests.get(proxy.url + "/echo", timeout=10)
    assert r.status_code == 502 and "TLS verification of the upstream failed" in r.text
    assert "127.0.0.1" in r.text  # the mismatch names the address it checked
    # tls_name: the server is given by IP, its certificate names it.
    proxy = start_proxy(tls_route(upstream, f"ca_file = {certs.ca_file}\ntls_name = api.internal.test"))
    r = requests.get(proxy.url + "/echo", timeout=10)
    assert r.status_code == 200
    assert r.json()["tls_sni"] == "api.internal.test"
    # Host header is still the client's, not the TLS name.
    assert ["Host", f"127.0.0.1:{proxy.port}"] in r.json()["headers"]


def test_sni_is_the_host_name_in_servers(start_proxy, start_upstream, certs):
    upstream = start_upstream(tls={"certfile": certs.cert, "keyfile": certs.key})
    proxy = start_proxy(f"""
        [upstream:app]
        servers = https://localhost:{upstream.port}
        ca_file = {certs.ca_file}
        [route:default]
        upstream = app
        """)
    r = requests.get(proxy.url + "/echo", timeout=10)
    assert r.status_code == 200
    assert r.json()["tls_sni"] == "localhost"


def test_tls_verify_no_accepts_any_certificate_and_warns_once_at_start(start_proxy, start_upstream, other_ca):
    upstream = start_upstream(tls={"certfile": other_ca.cert, "keyfile": other_ca.key})
    proxy = start_proxy(tls_route(upstream, "tls_verify = no"), workers=2)
    assert requests.get(proxy.url + "/echo", timeout=10).status_code == 200
    warnings = [line for line in proxy.log().splitlines() if "tls_verify = no" in line]
    assert len(warnings) == 1, warnings
    assert "[WARNING]" in warnings[0] and "[upstream:app]" in warnings[0]


def test_client_certificate_for_an_upstream_that_requires_one(start_proxy, start_upstream, certs):
    upstream = start_upstream(tls={"certfile": certs.cert, "keyfile": certs.key, "client-ca": certs.ca_file})
    client_cert, client_key = certs.issue("proxy-client", "rproxy.client.test")
    proxy = start_proxy(tls_route(upstream, f"ca_file = {certs.ca_file}\nclient_certfile = {client_cert}\n"
                                            f"client_keyfile = {client_key}"))
    r = requests.get(proxy.url + "/echo", timeout=10)
    assert r.status_code == 200
    assert r.json()["tls_client_cert"] is not None
    # Without one, the upstream drops the handshake: a 502 that says TLS.
    proxy = start_proxy(tls_route(upstream, f"ca_file = {certs.ca_file}"))
    r = requests.get(proxy.url + "/echo", timeout=10)
    assert r.status_code == 502
    assert "TLS with the upstream failed" in r.text


def test_health_checks_use_the_same_tls_settings(start_proxy, start_upstream, certs):
    upstream = start_upstream(tls={"certfile": certs.cert, "keyfile": certs.key})
    health = "health_check = GET /healthz\nhealth_interval = 100ms"
    proxy = start_proxy(tls_route(upstream, f"ca_file = {certs.ca_file}\n{health}"))
    time.sleep(0.5)  # a few checks
    assert requests.get(proxy.url + "/echo", timeout=10).status_code == 200
    assert "fails its health check" not in proxy.log()
    # Checked without the CA, the same server fails, for the TLS reason.
    proxy = start_proxy(tls_route(upstream, health))
    deadline = time.monotonic() + 10
    while "fails its health check" not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert re.search(r"fails its health check \(.*CERTIFICATE_VERIFY_FAILED", proxy.log()), proxy.log()
    assert requests.get(proxy.url + "/echo", timeout=10).status_code == 503


def test_config_rejects_unusable_tls_files(tmp_path, certs):
    ini = tmp_path / "bad.ini"
    ini.write_text(f"[upstream:app]\nservers = https://127.0.0.1:9\nclient_certfile = {certs.ca_file}\n"
                   f"[route:r]\nupstream = app\n")
    out = subprocess.run([str(BIN / "rproxy"), "check", str(ini)], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "[upstream:app] client_certfile: is not a certificate chain with its private key" in out.stderr
    ini.write_text("[upstream:app]\nservers = https://127.0.0.1:9\ntls_name = bad_name!\n[route:r]\nupstream = app\n")
    out = subprocess.run([str(BIN / "rproxy"), "check", str(ini)], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "[upstream:app] tls_name: 'bad_name!' is not a host name" in out.stderr
