"""TLS termination: certificates by SNI, protocol floor, the plain-HTTP
listener and its redirect, certificates replaced on disk while serving, and
refusing to start on a bad certificate."""

import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import warnings

import pytest
import trustme
from conftest import BIN, GUNICORN, REPO, HttpsConnection, free_port, raw_exchange, served_certificate, single_route
from cryptography import x509

from rproxy.tls.certificates import CertificateFiles, CertificateStore

RPROXY = str(BIN / "rproxy")


def write_pair(directory, name, cert):
    certfile, keyfile = directory / f"{name}.pem", directory / f"{name}.key"
    certfile.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    keyfile.write_bytes(cert.private_key_pem.bytes())
    return str(certfile), str(keyfile)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    now = datetime.datetime.now(datetime.timezone.utc)
    made = {
        "default": ca.issue_cert("default.test", "localhost", "127.0.0.1"),
        "a": ca.issue_cert("a.test"),
        "wild": ca.issue_cert("*.w.test"),
        "expired": ca.issue_cert("old.test", not_before=now - datetime.timedelta(days=30),
                                 not_after=now - datetime.timedelta(days=1)),
        "future": ca.issue_cert("new.test", not_before=now + datetime.timedelta(days=2),
                                not_after=now + datetime.timedelta(days=30)),
    }
    paths = {name: write_pair(directory, name, cert) for name, cert in made.items()}
    paths["ca"] = str(directory / "ca.pem")
    ca.cert_pem.write_to_path(paths["ca"])
    paths["trustme"] = ca
    paths["dir"] = directory
    return paths


def client_context(certs, **options) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certs["ca"])
    for name, value in options.items():
        setattr(context, name, value)
    return context


def names(cert) -> list[str]:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)


def tls_server(certs, **extra):
    keys = {"certfile": certs["default"][0], "keyfile": certs["default"][1]}
    keys.update(extra)
    return keys


CERTIFICATE_SECTIONS = """
[certificate:a]
certfile = {a[0]}
keyfile = {a[1]}
[certificate:wild]
certfile = {wild[0]}
keyfile = {wild[1]}
"""


def test_each_sni_name_gets_its_certificate_and_others_the_default(start_proxy, upstream, certs):
    proxy = start_proxy(single_route(upstream.port) + CERTIFICATE_SECTIONS.format(**certs),
                        server=tls_server(certs))
    context = client_context(certs)
    for server_name, expected in [("a.test", ["a.test"]), ("x.w.test", ["*.w.test"]),
                                  ("default.test", ["default.test", "localhost"]),
                                  ("localhost", ["default.test", "localhost"])]:
        assert names(served_certificate(proxy.port, server_name, context)) == expected, server_name
    # A wildcard covers one label only; unknown names and clients without SNI get the default.
    loose = client_context(certs, check_hostname=False)
    for server_name in ("deep.x.w.test", "unknown.test", "A.TEST.", None):
        expected = ["a.test"] if server_name == "A.TEST." else ["default.test", "localhost"]
        assert names(served_certificate(proxy.port, server_name, loose)) == expected, server_name
    connection = HttpsConnection(proxy.port, "a.test", context)
    response = connection.get("/echo/tls")
    assert response.status == 200
    headers = dict(json.loads(response.body)["headers"])
    assert headers["X-Forwarded-Proto"] == "https"
    connection.close()


def test_old_protocols_and_weak_ciphers_are_refused(start_proxy, upstream, certs):
    proxy = start_proxy(single_route(upstream.port), server=tls_server(certs))

    def handshake(**options):
        context = client_context(certs)
        ciphers = options.pop("ciphers", None)
        if ciphers:
            context.set_ciphers(ciphers)
        for name, value in options.items():
            setattr(context, name, value)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                return tls.version(), tls.cipher()[0]

    assert handshake()[0] == "TLSv1.3"
    assert handshake(maximum_version=ssl.TLSVersion.TLSv1_2)[0] == "TLSv1.2"
    with pytest.raises(ssl.SSLError), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # The client has to lower its own security level even to offer TLS 1.1.
        handshake(maximum_version=ssl.TLSVersion.TLSv1_1, minimum_version=ssl.TLSVersion.TLSv1,
                  ciphers="DEFAULT:@SECLEVEL=0")
    for weak in ("AES128-SHA", "ECDHE-ECDSA-AES128-SHA", "AES256-GCM-SHA384"):  # no ECDHE, or CBC
        with pytest.raises(ssl.SSLError):
            handshake(maximum_version=ssl.TLSVersion.TLSv1_2, ciphers=weak)
    assert handshake(maximum_version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-ECDSA-CHACHA20-POLY1305") == \
        ("TLSv1.2", "ECDHE-ECDSA-CHACHA20-POLY1305")


def test_tls_min_version_1_3_refuses_tls_1_2(start_proxy, upstream, certs):
    proxy = start_proxy(single_route(upstream.port), server=tls_server(certs, tls_min_version="1.3"))
    context = client_context(certs, maximum_version=ssl.TLSVersion.TLSv1_2)
    with pytest.raises(ssl.SSLError):
        served_certificate(proxy.port, "localhost", context)
    assert names(served_certificate(proxy.port, "localhost", client_context(certs)))


def test_plain_http_to_the_tls_port_gets_a_plain_400_and_no_traceback(start_proxy, upstream, certs):
    proxy = start_proxy(single_route(upstream.port), server=tls_server(certs))
    answer = raw_exchange(proxy.port, b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert b"this port speaks HTTPS" in answer
    # Garbage, and connections that hang up mid-handshake, are closed quietly too.
    assert raw_exchange(proxy.port, b"\x16\x03\x01\x00\x05hello").startswith(b"\x15\x03")  # a TLS alert
    socket.create_connection(("127.0.0.1", proxy.port)).close()
    response = HttpsConnection(proxy.port, "localhost", client_context(certs)).get("/echo/after")
    assert response.status == 200
    time.sleep(0.5)
    log = proxy.log()
    assert "sent plain HTTP to the TLS port" in log
    assert "Invalid request from ip" not in log  # gunicorn's warning per failed handshake


def test_a_client_that_never_completes_the_handshake_is_closed(start_proxy, upstream, certs):
    proxy = start_proxy(single_route(upstream.port), server=tls_server(certs, client_header_timeout="1s"))
    for hello in (b"", b"\x16\x03\x01\x00\xc8\x01"):  # nothing, or a ClientHello cut short
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as silent:
            silent.sendall(hello)
            started = time.monotonic()
            assert silent.recv(100) == b""
            assert 0.8 < time.monotonic() - started < 1.8
    assert len(proxy.wait_for_log(r"did not complete its TLS handshake within 1s: closed", count=2)) == 2
    assert "408" not in proxy.log()


def plain_request(port, target="/", host="a.test", method="GET", extra=b""):
    return raw_exchange(port, f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n".encode()
                        + extra + b"\r\n")


def test_http_listener_redirects_to_https_with_host_path_and_query(start_proxy, upstream, certs):
    http_port = free_port()
    proxy = start_proxy(single_route(upstream.port) + "[security_headers]\n",
                        server=tls_server(certs, http_bind=f"127.0.0.1:{http_port}"))
    answer = plain_request(http_port, "/a/b%20c?x=1&y=2", host="a.test:80")
    head = answer.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 308 Permanent Redirect"), head
    assert f"Location: https://a.test:{proxy.port}/a/b%20c?x=1&y=2" in head
    # HSTS over HTTPS only (RFC 6797 8.1: ignored, and pointless, over plain HTTP).
    assert "Strict-Transport-Security" not in head and "X-Content-Type-Options: nosniff" in head
    response = HttpsConnection(proxy.port, "localhost", client_context(certs)).get("/echo/hsts")
    assert response.getheader("Strict-Transport-Security") == "max-age=31536000; includeSubDomains"
    # A body is not read: the connection closes after the redirect.
    answer = plain_request(http_port, "/upload", method="POST", extra=b"Content-Length: 5\r\n\r\nhello")
    assert answer.startswith(b"HTTP/1.1 308") and b"Connection: close" in answer
    # The ACME challenge path stays reachable over plain HTTP (here it goes to the upstream).
    answer = plain_request(http_port, "/.well-known/acme-challenge/abc")
    assert b"HTTP/1.1 404" in answer and b"/.well-known/acme-challenge/abc" in answer
    # A trusted proxy in front that terminated TLS itself gets no redirect.
    answer = plain_request(http_port, "/echo/behind-lb", extra=b"X-Forwarded-Proto: https\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer


def test_curl_follows_the_redirect_and_https_port_names_the_public_port(start_proxy, upstream, certs):
    http_port = free_port()
    proxy = start_proxy(single_route(upstream.port), server=tls_server(certs, http_bind=f"127.0.0.1:{http_port}"))
    out = subprocess.run(["curl", "-sS", "-L", "--cacert", certs["ca"],
                          "--resolve", f"localhost:{http_port}:127.0.0.1",
                          "--resolve", f"localhost:{proxy.port}:127.0.0.1",
                          "-o", "/dev/null", "-w", "%{http_code} %{url_effective} %{num_redirects}",
                          f"http://localhost:{http_port}/echo/curl?q=1"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout == f"200 https://localhost:{proxy.port}/echo/curl?q=1 1", out.stderr

    http_port = free_port()  # behind NAT, clients reach the TLS port as 443
    start_proxy(single_route(upstream.port),
                server=tls_server(certs, http_bind=f"127.0.0.1:{http_port}", https_port="443"))
    assert b"Location: https://a.test/x\r\n" in plain_request(http_port, "/x")


def test_a_keep_alive_connection_parked_on_the_plain_listener_beside_tls_is_served_again(
        start_proxy, upstream, certs):
    # With TLS configured every listener's connections go through gevent's TLS
    # wrapper, which closed the socket the worker had parked (server/parking.py).
    http_port = free_port()
    proxy = start_proxy(single_route(upstream.port),
                        server=tls_server(certs, http_bind=f"127.0.0.1:{http_port}", redirect_http="no"))
    with socket.create_connection(("127.0.0.1", http_port), timeout=10) as s:
        for parked in (1, 2):
            s.sendall(b"GET /echo/plain HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b"}"):
                answer += s.recv(65536) or b"<closed>}"
            assert answer.startswith(b"HTTP/1.1 200"), answer
            proxy.wait_for_log("idle: parked", count=parked)
    assert "Traceback" not in proxy.log() and "Socket error" not in proxy.log(), proxy.log()


def test_redirect_http_no_serves_plain_http_as_http(start_proxy, upstream, certs):
    http_port = free_port()
    proxy = start_proxy(single_route(upstream.port),
                        server=tls_server(certs, http_bind=f"127.0.0.1:{http_port}", redirect_http="no"))
    answer = plain_request(http_port, "/echo/plain", extra=b"X-Forwarded-Proto: https\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer
    # Only the loopback default of trusted_proxies is trusted: its header is kept.
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert dict(body["headers"])["X-Forwarded-Proto"] == "https"
    answer = plain_request(http_port, "/echo/plain")
    assert dict(json.loads(answer.split(b"\r\n\r\n", 1)[1])["headers"])["X-Forwarded-Proto"] == "http"
    response = HttpsConnection(proxy.port, "localhost", client_context(certs)).get("/echo/tls")
    assert dict(json.loads(response.body)["headers"])["X-Forwarded-Proto"] == "https"


def test_admin_listener_stays_plain_http(start_proxy, upstream, certs):
    admin = free_port()
    start_proxy(single_route(upstream.port) + f"[admin]\nbind = 127.0.0.1:{admin}\n", server=tls_server(certs))
    assert raw_exchange(admin, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").startswith(
        b"HTTP/1.1 200")


def replace_pair(certfile, keyfile, cert):
    """Replace both files by rename, key first, as a deploy tool would."""
    for path, data in ((keyfile, cert.private_key_pem.bytes()),
                       (certfile, b"".join(pem.bytes() for pem in cert.cert_chain_pems))):
        with open(path + ".new", "wb") as f:
            f.write(data)
        os.replace(path + ".new", path)


def test_replaced_certificate_files_are_served_without_restart(start_proxy, upstream, certs, tmp_path):
    certfile, keyfile = write_pair(tmp_path, "live", certs["trustme"].issue_cert("live.test", "localhost"))
    proxy = start_proxy(single_route(upstream.port), server=tls_server(certs, certfile=certfile, keyfile=keyfile),
                        workers=2)
    context = client_context(certs)
    kept = HttpsConnection(proxy.port, "live.test", context)
    assert kept.get("/echo/1").status == 200
    old_serial = kept.certificate().serial_number

    renewed = certs["trustme"].issue_cert("live.test", "localhost")
    replace_pair(certfile, keyfile, renewed)
    new_serial = x509_serial(renewed)
    deadline = time.monotonic() + 10
    while served_certificate(proxy.port, "live.test", context).serial_number != new_serial:
        assert time.monotonic() < deadline, "the new certificate was not served"
        time.sleep(0.2)
    time.sleep(1.5)  # every worker has looked at the files by now
    for _ in range(12):
        assert served_certificate(proxy.port, "live.test", context).serial_number == new_serial
    # The connection opened before goes on, with the session it had.
    assert kept.get("/echo/2").status == 200
    assert kept.certificate().serial_number == old_serial
    kept.close()

    # A broken replacement is not served: the good certificate stays.
    with open(certfile, "wb") as f:
        f.write(b"not a certificate")
    deadline = time.monotonic() + 15
    while "still serving the certificate loaded before" not in proxy.log():
        assert time.monotonic() < deadline, "the broken certificate file was not reported"
        assert served_certificate(proxy.port, "live.test", context).serial_number == new_serial
        time.sleep(0.3)


def x509_serial(cert) -> int:
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number


# -- refusing to start ----------------------------------------------------------------------


def start_and_check(tmp_path, server_lines):
    ini = tmp_path / "rproxy.ini"
    ini.write_text(f"[server]\nbind = 127.0.0.1:{free_port()}\n{server_lines}\n" + single_route(9))
    env = {k: v for k, v in os.environ.items() if k != "RPROXY_CONFIG"}
    env["RPROXY_CONFIG"] = str(ini)
    started = subprocess.run([GUNICORN, "-c", "gunicorn.conf.py", "--no-control-socket"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=30)
    checked = subprocess.run([RPROXY, "check", str(ini)], capture_output=True, text=True, timeout=30)
    assert "Traceback" not in started.stderr + started.stdout + checked.stderr
    return started, checked


@pytest.mark.parametrize("case", ["missing", "directory", "not pem", "key mismatch", "key not pem",
                                  "expired", "not yet valid"])
def test_bad_certificate_stops_start_up_naming_file_and_problem(tmp_path, certs, case):
    certfile, keyfile = certs["default"]
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    key, problem = {
        "missing": ("certfile", f"cannot read '{tmp_path}/none.pem': No such file or directory"),
        "directory": ("certfile", f"cannot read '{tmp_path}': Is a directory"),
        "not pem": ("certfile", f"'{junk}' holds no PEM certificate"),
        "key mismatch": ("keyfile", f"'{certs['a'][1]}' is not the private key of the certificate in "
                                    f"'{certfile}'"),
        "key not pem": ("keyfile", f"'{junk}' holds no PEM private key"),
        "expired": ("certfile", f"the certificate in '{certs['expired'][0]}' expired on "),
        "not yet valid": ("certfile", f"the certificate in '{certs['future'][0]}' is not valid before "),
    }[case]
    certfile, keyfile = {
        "missing": (f"{tmp_path}/none.pem", keyfile), "directory": (str(tmp_path), keyfile),
        "not pem": (str(junk), keyfile), "key mismatch": (certfile, certs["a"][1]),
        "key not pem": (certfile, str(junk)), "expired": certs["expired"], "not yet valid": certs["future"],
    }[case]
    started, checked = start_and_check(tmp_path, f"certfile = {certfile}\nkeyfile = {keyfile}")
    assert started.returncode == 2 and checked.returncode != 0
    message = f"{tmp_path / 'rproxy.ini'}: [server] {key}: {problem}"
    assert message in started.stderr, started.stderr
    assert message in checked.stderr


def test_bad_certificate_section_is_named(tmp_path, certs):
    started, checked = start_and_check(tmp_path, f"certfile = {certs['default'][0]}\n"
                                                 f"keyfile = {certs['default'][1]}\n"
                                                 f"[certificate:old]\ncertfile = {certs['expired'][0]}\n"
                                                 f"keyfile = {certs['expired'][1]}\n")
    assert started.returncode == 2
    assert f"[certificate:old] certfile: the certificate in '{certs['expired'][0]}' expired on" in started.stderr


def test_certificate_store_prefers_exact_names_then_wildcards_then_fallbacks(tmp_path, certs):
    ca = certs["trustme"]

    def source(name, *names, fallback=False, write=True):
        certfile, keyfile = str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}.key")
        if write:
            write_pair(tmp_path, name, ca.issue_cert(*names))
        return CertificateFiles(certfile, keyfile, lambda c, k, name=name: name, name, fallback=fallback)

    default = source("default", "default.test")
    wildcard = source("wildcard", "*.example.test")
    exact = source("exact", "www.example.test")
    later = source("later", "later.test", write=False)  # an ACME certificate before its issuance
    fallback = source("fallback", "later.test", "api.example.test", "www.example.test", fallback=True)
    store = CertificateStore([later, exact, wildcard, fallback], [default, fallback], check_interval=0)
    chosen = {name: store.context_for(name) for name in
              ("www.example.test", "api.example.test", "later.test", "x.y.example.test", "other.test", None)}
    assert chosen == {"www.example.test": "exact", "api.example.test": "wildcard", "later.test": "fallback",
                      "x.y.example.test": "default", "other.test": "default", None: "default"}
    write_pair(tmp_path, "later", ca.issue_cert("later.test"))
    assert store.context_for("later.test") == "later"


def test_hup_reload_serves_a_new_certificate_section(start_proxy, upstream, certs):
    proxy = start_proxy(single_route(upstream.port), server=tls_server(certs))
    context = client_context(certs, check_hostname=False)
    assert names(served_certificate(proxy.port, "a.test", context)) == ["default.test", "localhost"]
    proxy.rewrite(single_route(upstream.port) + CERTIFICATE_SECTIONS.format(**certs))
    os.kill(proxy.pid, signal.SIGHUP)
    deadline = time.monotonic() + 20
    while names(served_certificate(proxy.port, "a.test", context)) != ["a.test"]:
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.2)


def test_held_stream_over_tls_gets_every_event_in_its_greenlet(start_proxy, upstream, certs):
    # TLS clients are not parked (server/held.py): an SSL socket may hold
    # decrypted bytes its watcher cannot see. The stream still gets it all.
    proxy = start_proxy(single_route(upstream.port), server=tls_server(certs))
    context = client_context(certs)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=15) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(b"GET /ticks?n=3&every=1.5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n0\r\n\r\n"), data
    assert [b"data: tick %d" % i in data for i in range(3)] == [True] * 3
    assert not proxy.log_lines("waits on its upstream: parked")
