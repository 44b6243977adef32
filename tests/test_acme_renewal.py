"""When certificates are renewed (ACME Renewal Information, RFC 9773), and
what /metrics and /readyz say about them.

The rules (the certificate's identifier, reading the CA's answer, the moment
chosen in its window) are checked in-process. End to end, rproxy runs under
gunicorn against pebble; pebble 2.4 (Debian's) has no renewalInfo, so the
tests put a small directory server in front of it that adds one and answers
it with the window each test scripts. Orders still go to pebble itself."""

import datetime
import http.server
import json
import re
import threading
import time

import pytest
import requests
from acme.client import _renewal_info_path_component
from conftest import free_port, served_certificate, single_route
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from test_acme import pebble, wait_for_certificate  # noqa: F401 - pebble is a fixture

from rproxy.tls import ari, certificates

UTC = datetime.timezone.utc


def certificate(serial: int, key_identifier: bytes | None) -> x509.Certificate:
    key = certificates.new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a.test")])
    now = datetime.datetime.now(UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(serial).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)))
    if key_identifier is not None:
        builder = builder.add_extension(x509.AuthorityKeyIdentifier(key_identifier, None, None), critical=False)
    return builder.sign(key, hashes.SHA256())


# -- the rules, in-process ------------------------------------------------------

def test_certificate_id_is_the_one_in_rfc_9773():
    # RFC 9773 §4.1, the worked example: keyIdentifier 69:88:5B:..., serial 00:87:65:43:21.
    aki = bytes.fromhex("69885B6B87464041E1B37B847BA0AE2CDE01C8D4")
    assert ari.certificate_id(certificate(0x87654321, aki)) == "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE"


@pytest.mark.parametrize("serial", [1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF_FFFF, 2 ** 159 - 1, 0x1234_5678_9ABC])
def test_certificate_id_agrees_with_the_acme_library(serial):
    cert = certificate(serial, bytes(range(20)))
    assert ari.certificate_id(cert) == _renewal_info_path_component(cert)


def test_certificate_without_authority_key_identifier_has_no_renewal_information():
    with pytest.raises(ari.RenewalInfoError, match="no Authority Key Identifier"):
        ari.certificate_id(certificate(5, None))


def test_window_is_read_from_the_answer():
    window = ari.parse_window({"suggestedWindow": {"start": "2026-01-02T04:00:00Z",
                                                   "end": "2026-01-03t04:00:00.123456789z"},
                               "explanationURL": "https://ca.example/why"})
    assert window.start == datetime.datetime(2026, 1, 2, 4, tzinfo=UTC).timestamp()
    assert window.end == pytest.approx(datetime.datetime(2026, 1, 3, 4, tzinfo=UTC).timestamp() + 0.123456)


@pytest.mark.parametrize("body, problem", [
    ({}, "no suggestedWindow"),
    ([], "no suggestedWindow"),
    ({"suggestedWindow": {"start": "2026-01-02T04:00:00Z"}}, "end is not a date-time"),
    ({"suggestedWindow": {"start": "yesterday", "end": "2026-01-02T04:00:00Z"}}, "'yesterday' is not an RFC 3339"),
    ({"suggestedWindow": {"start": "2026-01-02T04:00:00", "end": "2026-01-02T05:00:00Z"}}, "has no time zone"),
    ({"suggestedWindow": {"start": "2026-01-03T04:00:00Z", "end": "2026-01-02T04:00:00Z"}}, "ends before it starts"),
])
def test_unusable_answers_are_refused_with_the_reason(body, problem):
    with pytest.raises(ari.RenewalInfoError, match=problem):
        ari.parse_window(body)


def test_renewal_time_is_uniform_inside_the_window():
    window = ari.Window(1000.0, 2000.0)
    assert ari.choose(window, uniform=lambda a, b: a) == 1000.0
    assert ari.choose(window, uniform=lambda a, b: b) == 2000.0
    assert ari.choose(window, uniform=lambda a, b: a + (b - a) * 0.25) == 1250.0
    chosen = [ari.choose(window) for _ in range(200)]
    assert all(1000.0 <= t <= 2000.0 for t in chosen) and max(chosen) - min(chosen) > 500


def test_ask_again_follows_retry_after_within_bounds():
    now = 1_000_000.0
    assert ari.retry_after("3600", now) == now + 3600
    assert ari.retry_after(None, now) == now + 6 * 3600
    assert ari.retry_after("soon", now) == now + 6 * 3600
    assert ari.retry_after("1", now) == now + 60  # at most once a minute
    assert ari.retry_after("9999999", now) == now + 24 * 3600  # at least once a day
    date = datetime.datetime.fromtimestamp(now + 7200, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert ari.retry_after(date, now) == now + 7200


# -- end to end -------------------------------------------------------------------

class RenewalInfoCA:
    """An ACME directory that is pebble's plus a renewalInfo URL, which answers
    what `answer(certificate id)` returns: (status, JSON body)."""

    def __init__(self, ca, answer):
        pebble_directory = requests.get(ca.directory, verify=ca.ca_file, timeout=10).json()
        assert "renewalInfo" not in pebble_directory  # else: test pebble itself
        self.port = free_port()
        self.directory = f"http://127.0.0.1:{self.port}/dir"
        self.asked: list[str] = []
        directory = json.dumps({**pebble_directory, "renewalInfo": f"http://127.0.0.1:{self.port}/ari/"}).encode()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/dir":
                    status, body = 200, directory
                elif self.path.startswith("/ari/"):
                    outer.asked.append(self.path[len("/ari/"):])
                    status, answer = answer_for(outer.asked[-1])
                    body = json.dumps(answer).encode()
                else:
                    status, body = 404, b"{}"
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Retry-After", "3600")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        answer_for = answer
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def renewal_info_ca():
    started = []

    def start(ca, answer):
        started.append(RenewalInfoCA(ca, answer))
        return started[-1]
    yield start
    for server in started:
        server.stop()


def window(start: datetime.datetime, end: datetime.datetime) -> dict:
    return {"suggestedWindow": {"start": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                "end": end.strftime("%Y-%m-%dT%H:%M:%SZ")}}


def acme_proxy(start_proxy, upstream, ca, directory, cache_dir, admin=None, domains="a.test", **acme):
    keys = {"domains": domains, "directory": directory, "cache_dir": cache_dir, "ca_file": ca.ca_file,
            "retry_interval": "1s", "challenges": "http-01", **acme}
    ini = single_route(upstream.port) + "[acme]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
    if admin:
        ini += f"[admin]\nbind = 127.0.0.1:{admin}\n"
    return start_proxy(ini, server={"http_bind": f"127.0.0.1:{ca.http_port}"})


def test_certificate_is_renewed_when_the_ca_suggests_a_window_in_the_past(start_proxy, upstream, pebble,
                                                                          renewal_info_ca, tmp_path):
    ca = pebble(free_port())
    now = datetime.datetime.now(UTC)
    later = window(now + datetime.timedelta(days=20), now + datetime.timedelta(days=21))
    past = window(now - datetime.timedelta(days=2), now - datetime.timedelta(days=1))
    first_id = []

    def answer(cert_id):
        # The first certificate issued should be replaced at once (as if the CA
        # were about to revoke it); its replacement, in 20 days.
        first_id[:1] = first_id or [cert_id]
        return 200, past if cert_id == first_id[0] else later

    front = renewal_info_ca(ca, answer)
    proxy = acme_proxy(start_proxy, upstream, ca, front.directory, tmp_path / "acme")
    trusted = ca.trusting_context()
    first = wait_for_certificate(proxy.port, "a.test", trusted)
    proxy.wait_for_log(r"acme: a.test: the CA suggests renewing between .* renewal due now", timeout=30)
    renewed = wait_for_certificate(proxy.port, "a.test", trusted, not_serial=first.serial_number)
    assert renewed.serial_number != first.serial_number
    due = proxy.wait_for_log(r"acme: a.test: the CA suggests renewing between", count=2, timeout=30)[1]
    chosen = re.search(r"renewal due (\S+ \S+) UTC", due).group(1)
    chosen = datetime.datetime.strptime(chosen, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    assert now + datetime.timedelta(days=20) - datetime.timedelta(seconds=1) <= chosen \
        <= now + datetime.timedelta(days=21)
    # rproxy asked about each certificate by its RFC 9773 identifier.
    assert ari.certificate_id(first) in front.asked and ari.certificate_id(renewed) in front.asked
    time.sleep(2)
    assert len(proxy.log_lines(r"acme: a.test: obtained a certificate")) == 2
    assert served_certificate(proxy.port, "a.test", trusted).serial_number == renewed.serial_number


def test_unusable_renewal_information_falls_back_to_renew_before_and_is_logged_once(
        start_proxy, upstream, pebble, renewal_info_ca, tmp_path):
    ca = pebble(free_port())
    front = renewal_info_ca(ca, lambda cert_id: (500, {"type": "urn:ietf:params:acme:error:serverInternal"}))
    proxy = acme_proxy(start_proxy, upstream, ca, front.directory, tmp_path / "acme")
    wait_for_certificate(proxy.port, "a.test", ca.trusting_context())
    line = proxy.wait_for_log(r"acme: a.test: no renewal information from the CA", timeout=30)[0]
    assert "/ari/" in line and "answered 500" in line and line.endswith("30d before expiry"), line
    time.sleep(2)
    assert len(proxy.log_lines(r"no renewal information from the CA")) == 1
    assert len(proxy.log_lines(r"acme: a.test: obtained a certificate")) == 1


def readyz(admin) -> requests.Response:
    return requests.get(f"http://127.0.0.1:{admin}/readyz", timeout=10)


def expiry_metric(admin, name) -> float | None:
    text = requests.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).text
    found = re.search(r'^rproxy_certificate_expiry_seconds\{name="%s"\} (\S+)$' % re.escape(name), text, re.M)
    return float(found.group(1)) if found else None


def test_readyz_is_503_until_each_acme_domain_has_a_certificate(start_proxy, upstream, pebble, tmp_path):
    # The CA is not up yet: the domains are served the placeholder.
    ca = pebble(free_port(), start=False)
    admin = free_port()
    proxy = acme_proxy(start_proxy, upstream, ca, ca.directory, tmp_path / "acme", admin=admin,
                       domains="a.test b.test")
    proxy.wait_for_log(r"acme: b.test: could not obtain a certificate", timeout=30)
    answer = readyz(admin)
    assert answer.status_code == 503
    assert answer.json()["reasons"] == ["certificate a.test: none valid", "certificate b.test: none valid"]
    assert expiry_metric(admin, "a.test") is None  # the placeholder stands for no certificate

    ca.start()
    trusted = ca.trusting_context()
    certs = {name: wait_for_certificate(proxy.port, name, trusted) for name in ("a.test", "b.test")}
    deadline = time.monotonic() + 30
    while (answer := readyz(admin)).status_code != 200:
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.2)
    assert answer.json()["reasons"] == []
    for name, cert in certs.items():
        left = cert.not_valid_after_utc.timestamp() - time.time()
        assert expiry_metric(admin, name) == pytest.approx(left, abs=30)


def test_expiry_metric_counts_down_for_certificate_files(start_proxy, upstream, certs, tmp_path):
    certfile, keyfile = certs.issue("files", "c.test", "*.d.test")
    admin = free_port()
    start_proxy(single_route(upstream.port) + f"[admin]\nbind = 127.0.0.1:{admin}\n",
                server={"certfile": certfile, "keyfile": keyfile})
    leaf = certificates.load_chain(certfile)[0]
    first = expiry_metric(admin, "c.test")
    assert first == pytest.approx(leaf.not_valid_after_utc.timestamp() - time.time(), abs=30)
    assert expiry_metric(admin, "*.d.test") == pytest.approx(first, abs=30)
    time.sleep(1.1)
    assert expiry_metric(admin, "c.test") < first
    assert readyz(admin).status_code == 200
