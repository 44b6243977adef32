"""ACME end to end against pebble, Let's Encrypt's test CA, on loopback.

pebble validates HTTP-01 challenges by connecting to each test domain at
rproxy's plain-HTTP port; pebble-challtestsrv is its DNS and resolves every
name to 127.0.0.1 (or fails one on purpose). Nothing is mocked: rproxy runs
under gunicorn, pebble issues real certificates, clients verify them against
pebble's root."""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import time

import httpx
import pytest
import requests
import trustme
from conftest import (
    HttpsConnection,
    Process,
    Started,
    free_port,
    raw_exchange,
    served_certificate,
    single_route,
    wait_for_port,
)
from cryptography import x509

from rproxy.tls import alpn_challenge, certificates


def free_udp_and_tcp_port() -> int:
    while True:
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (Debian package pebble): python3 scripts/dev.py test installs it")
    return path


class Pebble:
    """pebble and its mock DNS, each a process on free loopback ports; with
    `dns` (127.0.0.1:PORT), pebble asks that DNS server instead."""

    def __init__(self, tmp_dir, http_port: int, validity: int | None = None, tls_port: int | None = None,
                 start: bool = True, dns: str | None = None):
        self.tmp_dir, self.http_port, self.validity = tmp_dir, http_port, validity
        self.tls_port = tls_port or free_port()
        self.port, self.management = free_port(), free_port()
        self.dns, self.dns_management = free_udp_and_tcp_port(), free_port()
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.ca_file = str(tmp_dir / "pebble-ca.pem")
        ca.cert_pem.write_to_path(self.ca_file)
        self.certfile, self.keyfile = str(tmp_dir / "pebble-cert.pem"), str(tmp_dir / "pebble-key.pem")
        cert.cert_chain_pems[0].write_to_path(self.certfile)
        cert.private_key_pem.write_to_path(self.keyfile)
        self.directory = f"https://127.0.0.1:{self.port}/dir"
        self.dns_address = dns or f"127.0.0.1:{self.dns}"
        self.dns_server = None if dns else Process([program("pebble-challtestsrv"), "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                                   "-dns01", f"127.0.0.1:{self.dns}", "-http01", "", "-https01", "",
                                   "-tlsalpn01", "", "-management", f"127.0.0.1:{self.dns_management}"],
                                  tmp_dir / f"challtestsrv-{self.dns}.log")
        if self.dns_server is not None:
            wait_for_port(self.dns_management, self.dns_server.proc)
        self.ca = None
        if start:
            self.start()

    def start(self) -> None:
        """Start pebble (again): same ports, but a new CA, knowing no accounts."""
        settings = {"listenAddress": f"127.0.0.1:{self.port}",
                    "managementListenAddress": f"127.0.0.1:{self.management}",
                    "certificate": self.certfile, "privateKey": self.keyfile,
                    "httpPort": self.http_port, "tlsPort": self.tls_port,
                    "ocspResponderURL": "", "externalAccountBindingRequired": False}
        if self.validity:
            settings["certificateValidityPeriod"] = self.validity
        config = self.tmp_dir / f"pebble-{self.port}.json"
        config.write_text(json.dumps({"pebble": settings}))
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0",
                   PEBBLE_VA_ALWAYS_VALID="0")
        self.ca = Process([program("pebble"), "-config", str(config), "-dnsserver", self.dns_address],
                          self.tmp_dir / f"pebble-{self.port}-{time.monotonic_ns()}.log", env=env)
        wait_for_port(self.port, self.ca.proc)
        wait_for_port(self.management, self.ca.proc)

    def stop_ca(self) -> None:
        self.ca.stop()

    def root(self) -> str:
        return requests.get(f"https://127.0.0.1:{self.management}/roots/0", verify=self.ca_file, timeout=10).text

    def trusting_context(self) -> ssl.SSLContext:
        """A client context that trusts what this pebble issues, and nothing else."""
        return ssl.create_default_context(cadata=self.root())

    def fail_dns(self, host: str) -> None:
        requests.post(f"http://127.0.0.1:{self.dns_management}/set-servfail", json={"host": host},
                      timeout=10).raise_for_status()

    def stop(self) -> None:
        if self.ca is not None:
            self.ca.stop()
        if self.dns_server is not None:
            self.dns_server.stop()


@pytest.fixture
def pebble(tmp_path):
    started = Started(lambda http_port, **kwargs: Pebble(tmp_path, http_port, **kwargs))
    yield started.start
    started.stop_all()


def acme_proxy(start_proxy, upstream, ca: Pebble, cache_dir, domains="a.test b.test", workers=1, **acme):
    keys = {"domains": domains, "email": "ops@a.test", "directory": ca.directory, "cache_dir": cache_dir,
            "ca_file": ca.ca_file, "retry_interval": "1s", "challenges": "http-01", **acme}
    section = "[acme]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
    return start_proxy(single_route(upstream.port) + section,
                       server={"http_bind": f"127.0.0.1:{ca.http_port}"}, workers=workers)


def wait_for_certificate(port, name, context, timeout=30.0, not_serial=None):
    """The first certificate for `name` that verifies with `context` (and is not `not_serial`)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            cert = served_certificate(port, name, context)
            if cert.serial_number != not_serial:
                return cert
        except (ssl.SSLError, OSError) as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"no new certificate for {name} verified within {timeout}s (last error: {last})")


def settle():
    """Workers look at the certificate files at most once a second: after one
    served a new certificate, give the others that second."""
    time.sleep(1.5)


def test_first_issuance_serves_certificates_from_the_ca(start_proxy, upstream, pebble, tmp_path):
    ca = pebble(free_port())
    cache = tmp_path / "acme"
    proxy = acme_proxy(start_proxy, upstream, ca, cache, workers=2)
    trusted = ca.trusting_context()
    for name in ("a.test", "b.test"):
        cert = wait_for_certificate(proxy.port, name, trusted)
        assert "Pebble Intermediate CA" in cert.issuer.rfc4514_string()
    settle()
    response = HttpsConnection(proxy.port, "a.test", trusted).get("/echo/acme")
    assert response.status == 200
    # One worker ordered; the CA reached a worker on the plain port for each challenge.
    assert len(proxy.log_lines(r"acme: worker \d+ manages the certificates of a.test b.test")) == 1
    assert len(proxy.log_lines(r"GET /.well-known/acme-challenge/\S+ HTTP/1.1\" 200 .*Pebble-VA")) >= 2
    issued = proxy.log_lines(r"acme: (a|b).test: obtained a certificate in [\d.]+s, valid until")
    assert len(issued) == 2, proxy.log()
    # Private keys are readable by rproxy's user only.
    issuer_dir = next(p for p in cache.iterdir() if p.is_dir() and p.name not in ("challenges", "tls-alpn-01"))
    for path in [issuer_dir / "account.key", *(issuer_dir / "certificates").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert list((cache / "challenges").iterdir()) == []  # tokens are removed after the order
    # Plain HTTP redirects; nothing was proxied upstream for the challenges.
    answer = raw_exchange(ca.http_port, b"GET /x?y=1 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 308") and f"https://a.test:{proxy.port}/x?y=1".encode() in answer
    assert not proxy.log_lines(r"acme-challenge.*upstream=127")


def test_restart_reuses_the_cached_certificate(start_proxy, upstream, pebble, tmp_path):
    ca = pebble(free_port())
    cache = tmp_path / "acme"
    first = acme_proxy(start_proxy, upstream, ca, cache, domains="a.test")
    trusted = ca.trusting_context()
    serial = wait_for_certificate(first.port, "a.test", trusted).serial_number
    first.stop()

    second = acme_proxy(start_proxy, upstream, ca, cache, domains="a.test")
    # Served from the first handshake on, no new order.
    assert served_certificate(second.port, "a.test", trusted).serial_number == serial
    second.wait_for_log(r"acme: a.test: certificate from the cache, renewal due", timeout=30)
    time.sleep(1)
    assert not second.log_lines(r"obtained a certificate|registered account|acme-challenge")


def test_renewal_reaches_every_worker_without_dropping_connections(start_proxy, upstream, pebble, tmp_path):
    ca = pebble(free_port(), validity=3600)
    # Due 3592s before expiry: 8s after issuance, a window no default would give.
    proxy = acme_proxy(start_proxy, upstream, ca, tmp_path / "acme", domains="a.test", workers=2,
                       renew_before="3592s")
    trusted = ca.trusting_context()
    first = wait_for_certificate(proxy.port, "a.test", trusted)
    settle()
    kept = HttpsConnection(proxy.port, "a.test", trusted)
    assert kept.get("/echo/before").status == 200
    assert kept.certificate().serial_number == first.serial_number

    # The connection opened before goes on serving requests (within the keep-alive
    # timeout) through the renewal, on its old session.
    deadline = time.monotonic() + 30
    while (renewed := served_certificate(proxy.port, "a.test", trusted)).serial_number == first.serial_number:
        assert time.monotonic() < deadline, "not renewed"
        assert kept.get("/echo/during").status == 200
        time.sleep(0.5)
    due = first.not_valid_after_utc.timestamp() - 3592
    assert renewed.not_valid_before_utc.timestamp() >= due - 1, "renewed before it was due"
    settle()
    serials = {served_certificate(proxy.port, "a.test", trusted).serial_number for _ in range(12)}
    assert first.serial_number not in serials
    for i in range(3):
        assert kept.get(f"/echo/after-{i}").status == 200
    assert kept.certificate().serial_number == first.serial_number
    kept.close()


def test_ca_outage_keeps_the_old_certificate_logs_and_backs_off_then_recovers(start_proxy, upstream, pebble,
                                                                              tmp_path):
    ca = pebble(free_port(), validity=3600)
    proxy = acme_proxy(start_proxy, upstream, ca, tmp_path / "acme", domains="a.test", renew_before="3594s")
    first = wait_for_certificate(proxy.port, "a.test", ca.trusting_context())
    ca.stop_ca()

    failures = proxy.wait_for_log(r"acme: a.test: could not obtain a certificate", count=3, timeout=30)
    for line, wait in zip(failures, ("1s", "2s", "4s")):
        assert f"from {ca.directory}: cannot reach the CA:" in line and "Connection refused" in line
        assert "still serving the current certificate (valid until" in line
        assert line.endswith(f"next attempt in {wait}"), line
    # Still served, without verification trouble beyond the CA being gone.
    loose = ssl.create_default_context()
    loose.check_hostname, loose.verify_mode = False, ssl.CERT_NONE
    assert served_certificate(proxy.port, "a.test", loose).serial_number == first.serial_number

    ca.start()  # a new CA on the same URL: it knows no account, so rproxy registers again
    renewed = wait_for_certificate(proxy.port, "a.test", ca.trusting_context(), timeout=30)
    assert renewed.serial_number != first.serial_number
    assert len(proxy.log_lines(r"acme: registered account")) == 2


def test_validation_failure_is_logged_with_the_ca_error_and_other_domains_are_served(start_proxy, upstream,
                                                                                     pebble, tmp_path):
    ca = pebble(free_port())
    ca.fail_dns("fail.test")
    proxy = acme_proxy(start_proxy, upstream, ca, tmp_path / "acme", domains="fail.test a.test")
    failures = proxy.wait_for_log(r"acme: fail.test: could not obtain a certificate", count=2, timeout=30)
    assert "validation of fail.test failed: connection: " in failures[0], failures[0]
    assert "could not resolve URL \"http://fail.test:" in failures[0]
    assert "serving a placeholder certificate until then; next attempt in 1s" in failures[0]
    assert failures[1].endswith("next attempt in 2s")
    # The failing domain does not hold up the others.
    wait_for_certificate(proxy.port, "a.test", ca.trusting_context())
    # Until it has its certificate, fail.test gets a self-signed placeholder (as Traefik does).
    loose = ssl.create_default_context()
    loose.check_hostname, loose.verify_mode = False, ssl.CERT_NONE
    placeholder = served_certificate(proxy.port, "fail.test", loose)
    assert "rproxy placeholder certificate" in placeholder.subject.rfc4514_string()


def test_another_worker_takes_over_when_the_managing_worker_dies(start_proxy, upstream, pebble, tmp_path):
    ca = pebble(free_port())
    proxy = acme_proxy(start_proxy, upstream, ca, tmp_path / "acme", domains="a.test", workers=2)
    wait_for_certificate(proxy.port, "a.test", ca.trusting_context())
    managing = proxy.wait_for_log(r"acme: worker \d+ manages", timeout=30)[0]
    leader = int(re.search(r"acme: worker (\d+) manages", managing).group(1))
    os.kill(leader, signal.SIGKILL)
    took_over = proxy.wait_for_log(r"acme: worker \d+ manages", count=2, timeout=30)[1]
    assert f"worker {leader} " not in took_over
    proxy.wait_for_log(r"acme: a.test: certificate from the cache", timeout=30)


def test_hup_reload_with_a_new_domain_orders_it_and_keeps_the_others(start_proxy, upstream, pebble, tmp_path):
    ca = pebble(free_port())
    cache = tmp_path / "acme"
    proxy = acme_proxy(start_proxy, upstream, ca, cache, domains="a.test")
    trusted = ca.trusting_context()
    serial = wait_for_certificate(proxy.port, "a.test", trusted).serial_number
    proxy.rewrite(single_route(upstream.port) + f"[acme]\ndomains = a.test c.test\ndirectory = {ca.directory}\n"
                                                f"cache_dir = {cache}\nca_file = {ca.ca_file}\nretry_interval = 1s\n"
                                                f"challenges = http-01\n")
    os.kill(proxy.pid, signal.SIGHUP)
    wait_for_certificate(proxy.port, "c.test", trusted)
    settle()
    assert served_certificate(proxy.port, "a.test", trusted).serial_number == serial
    assert len(proxy.log_lines(r"acme: a.test: obtained")) == 1
    assert len(proxy.log_lines(r"acme: worker \d+ manages the certificates of a.test c.test")) == 1


def tls_alpn_proxy(start_proxy, upstream, directory, cache_dir, ca_file, domains="a.test", workers=1, **acme):
    """rproxy with [acme], HTTP/2, and no plain-HTTP listener at all."""
    keys = {"domains": domains, "directory": directory, "cache_dir": cache_dir, "retry_interval": "1s",
            "challenges": "tls-alpn-01 http-01", **({"ca_file": ca_file} if ca_file else {}), **acme}
    section = "[acme]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
    return start_proxy(single_route(upstream.port) + section, server={"http2": "yes"}, workers=workers)


def test_tls_alpn_01_obtains_certificates_on_the_tls_port_alone(start_proxy, upstream, pebble, tmp_path):
    # Nothing listens on the HTTP port pebble knows: only TLS-ALPN-01 can succeed.
    ca = pebble(free_port(), start=False)
    cache = tmp_path / "acme"
    proxy = tls_alpn_proxy(start_proxy, upstream, ca.directory, cache, ca.ca_file, domains="a.test b.test",
                           workers=2)
    # pebble validates on rproxy's TLS port, known only now; rproxy retries until the CA is up.
    ca.tls_port = proxy.port
    ca.start()
    trusted = ca.trusting_context()
    for name in ("a.test", "b.test"):
        cert = wait_for_certificate(proxy.port, name, trusted)
        assert "Pebble Intermediate CA" in cert.issuer.rfc4514_string()
    settle()
    for alpn in (None, ["http/1.1"]):
        context = ca.trusting_context()
        if alpn:
            context.set_alpn_protocols(alpn)
        assert HttpsConnection(proxy.port, "b.test", context).get("/echo/x").status == 200
    assert len(proxy.log_lines(r"tls: answered the TLS-ALPN-01 validation from 127.0.0.1")) >= 2
    assert not proxy.log_lines(r"acme-challenge")
    assert len(proxy.log_lines(r"acme: (a|b).test: obtained a certificate")) == 2
    assert list((cache / "tls-alpn-01").iterdir()) == []  # challenge certificates are removed after the order


def challenge_digest(cert) -> bytes:
    extension = cert.extensions.get_extension_for_oid(alpn_challenge.ACME_IDENTIFIER)
    assert extension.critical
    return extension.value.value


def handshake(port, server_name, alpn, send_slowly=False):
    """(certificate, negotiated protocol, the TLS socket) of a fresh connection offering `alpn`."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    if send_slowly:
        # The ClientHello in two TCP segments, 0.3 s apart.
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.sendall(hello[:40])
        time.sleep(0.3)
        raw.sendall(hello[40:])
        while True:
            incoming.write(raw.recv(65536))
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
        if data := outgoing.read():
            raw.sendall(data)
        cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        return cert, tls.selected_alpn_protocol(), raw
    sock = context.wrap_socket(raw, server_hostname=server_name)
    return x509.load_der_x509_certificate(sock.getpeercert(binary_form=True)), sock.selected_alpn_protocol(), sock


def closed_by_server(sock, timeout=10.0) -> bool:
    """Whether the server closes `sock` within `timeout` (what it sends before is read and dropped)."""
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return True
    except socket.timeout:
        pass
    return False


def test_pending_tls_alpn_challenge_answers_only_the_validation(start_proxy, upstream, tmp_path):
    """While a challenge for a.test is pending, only a client offering exactly
    acme-tls/1 for a.test gets the challenge certificate (and the connection
    closes after the handshake); every other client is served as usual."""
    cache = tmp_path / "acme"
    # A CA that is not there: the challenge file below is the only one, and stays.
    proxy = tls_alpn_proxy(start_proxy, upstream, f"https://127.0.0.1:{free_port()}/dir", cache, None,
                           domains="a.test b.test", workers=2)
    proxy.wait_for_log(r"acme: a.test: could not obtain a certificate", timeout=30)
    key_authorization = "token-abc.thumbprint-xyz"
    (cache / "tls-alpn-01" / "a.test.pem").write_bytes(alpn_challenge.challenge_certificate("a.test", key_authorization))
    # RFC 8737 §3: the extension holds the DER OCTET STRING of the digest.
    expected = b"\x04\x20" + hashlib.sha256(key_authorization.encode()).digest()

    # Clients that send nothing (or half a ClientHello) hold up no one else.
    silent = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10) for _ in range(4)]
    silent[0].sendall(b"\x16\x03\x01\x02\x00\x01")
    for attempt in range(4):  # both workers, whichever gets the connection
        cert, protocol, sock = handshake(proxy.port, "a.test", ["acme-tls/1"], send_slowly=attempt == 1)
        assert protocol == "acme-tls/1"
        assert challenge_digest(cert) == expected
        assert certificates.names_of(cert) == ("a.test",)
        assert closed_by_server(sock)  # after the handshake, without waiting for a request
        sock.close()

    # Everyone else: the placeholder, and answers.
    for name, alpn in [("a.test", None), ("a.test", ["h2", "http/1.1"]), ("a.test", ["http/1.1"]),
                       ("a.test", ["h2", "acme-tls/1"]), ("b.test", ["acme-tls/1"]), (None, ["acme-tls/1"])]:
        cert, protocol, sock = handshake(proxy.port, name, alpn)
        assert "rproxy placeholder certificate" in cert.subject.rfc4514_string(), (name, alpn)
        assert protocol != "acme-tls/1"
        sock.close()
    for alpn in (None, ["http/1.1"]):
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        if alpn:
            context.set_alpn_protocols(alpn)
        assert HttpsConnection(proxy.port, "a.test", context).get("/echo/during").status == 200
    with httpx.Client(http2=True, verify=False, timeout=10) as client:
        response = client.get(f"https://127.0.0.1:{proxy.port}/echo/h2", headers={"Host": "a.test"})
    assert response.status_code == 200 and response.http_version == "HTTP/2"
    # Plain HTTP to the TLS port is still answered 400 while a challenge is pending.
    assert raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").startswith(b"HTTP/1.1 400")

    for sock in silent:
        sock.close()

    # Answered: the next validation-like client gets the ordinary certificate.
    (cache / "tls-alpn-01" / "a.test.pem").unlink()
    cert, protocol, sock = handshake(proxy.port, "a.test", ["acme-tls/1"])
    sock.close()
    assert "rproxy placeholder certificate" in cert.subject.rfc4514_string() and protocol is None


def test_challenges_default_to_tls_alpn_first_and_skip_http_01_without_a_plain_listener(tmp_path):
    from rproxy import config
    from rproxy.tls import acme
    ini = tmp_path / "rproxy.ini"
    base = f"{single_route(1)}[acme]\ndomains = a.test\ncache_dir = {tmp_path / 'acme'}\n"
    ini.write_text("[server]\nbind = 127.0.0.1:8443\n" + base)
    loaded = config.load(str(ini))
    assert loaded.acme.challenges == ("tls-alpn-01", "http-01")
    assert acme.usable_challenges(loaded) == ("tls-alpn-01",)
    ini.write_text("[server]\nbind = 127.0.0.1:8443\nhttp_bind = 127.0.0.1:8080\n" + base
                   + "challenges = http-01 tls-alpn-01\n")
    assert acme.usable_challenges(config.load(str(ini))) == ("http-01", "tls-alpn-01")
