"""ACME DNS-01 end to end: pebble asks a real BIND (named, run as the
current user on a free loopback port) for the `_acme-challenge` TXT records
that rproxy publishes there, by RFC 2136 updates signed with a TSIG key or
through an exec hook. Clients verify the certificates against pebble's root."""

import base64
import os
import ssl
import stat
import sys
import textwrap
import time

import pytest
from conftest import Process, free_port, served_certificate, single_route, wait_for_port
from test_acme import free_udp_and_tcp_port, pebble, program, wait_for_certificate  # noqa: F401 - pebble is a fixture

from rproxy.tls import certificates

ZONE = "example.test"
KEY_NAME = "rproxy-test"


class Named:
    """named in the foreground, with one zone that KEY_NAME may update."""

    def __init__(self, tmp_dir):
        self.dir = tmp_dir / "named"
        self.dir.mkdir()
        self.port = free_udp_and_tcp_port()
        self.address = f"127.0.0.1:{self.port}"
        self.secret = base64.b64encode(os.urandom(32)).decode()
        (self.dir / f"{ZONE}.zone").write_text(textwrap.dedent(f"""\
            $TTL 60
            @   IN SOA ns.{ZONE}. hostmaster.{ZONE}. 1 60 60 600 60
            @   IN NS ns.{ZONE}.
            ns  IN A 127.0.0.1
            """))
        conf = self.dir / "named.conf"
        conf.write_text(textwrap.dedent(f"""\
            options {{
                directory "{self.dir}";
                pid-file none;
                session-keyfile "{self.dir}/session.key";
                managed-keys-directory "{self.dir}";
                listen-on port {self.port} {{ 127.0.0.1; }};
                listen-on-v6 {{ none; }};
                recursion no;
                dnssec-validation no;
                notify no;
            }};
            controls {{ }};
            key "{KEY_NAME}" {{ algorithm hmac-sha256; secret "{self.secret}"; }};
            zone "{ZONE}" {{
                type primary;
                file "{self.dir}/{ZONE}.zone";
                allow-update {{ key "{KEY_NAME}"; }};
            }};
            """))
        named = "/usr/sbin/named"
        if not os.path.exists(named):
            program("named")  # fails with the hint to install it
        self.process = Process([named, "-g", "-4", "-c", str(conf)], tmp_dir / f"named-{self.port}.log")
        wait_for_port(self.port, self.process.proc)
        deadline = time.monotonic() + 15
        while "running" not in self.process.log():
            assert time.monotonic() < deadline, self.process.log()
            time.sleep(0.05)

    def txt(self, name: str) -> set[str]:
        from rproxy.tls import dns01
        return dns01.answers(("127.0.0.1", self.port), name)

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture
def named(tmp_path):
    server = Named(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def ca(tmp_path, named, pebble):
    """pebble, asking named for the TXT records."""
    return pebble(free_port(), dns=named.address)


def dns_proxy(start_proxy, upstream, ca, named, cache_dir, domains, **acme):
    keys = {"domains": domains, "directory": ca.directory, "cache_dir": cache_dir, "ca_file": ca.ca_file,
            "retry_interval": "1s", "challenges": "dns-01", "dns_provider": "rfc2136",
            "dns_server": named.address, "dns_tsig_key_name": KEY_NAME, "dns_tsig_secret": "${TEST_TSIG_SECRET}",
            "dns_propagation_timeout": "20s", **acme}
    section = "[acme]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
    return start_proxy(single_route(upstream.port) + section, env={"TEST_TSIG_SECRET": named.secret})


def test_dns01_rfc2136_certificate_verifies_and_the_record_is_removed(start_proxy, upstream, named, ca, tmp_path):
    proxy = dns_proxy(start_proxy, upstream, ca, named, tmp_path / "acme", "a.example.test")
    trusted = ca.trusting_context()
    cert = wait_for_certificate(proxy.port, "a.example.test", trusted)
    assert "Pebble Intermediate CA" in cert.issuer.rfc4514_string()
    proxy.wait_for_log(r"acme: a.example.test: obtained a certificate")
    assert "Starting 3 validations" in ca.ca.log()
    # The zone's server took the signed update, then its removal.
    assert "updating zone 'example.test/IN': adding an RR at '_acme-challenge.a.example.test' TXT" in named.process.log()
    assert named.txt("_acme-challenge.a.example.test") == set()


def test_dns01_wildcard_certificate_serves_every_subdomain(start_proxy, upstream, named, ca, tmp_path):
    cache = tmp_path / "acme"
    proxy = dns_proxy(start_proxy, upstream, ca, named, cache, "*.example.test")
    trusted = ca.trusting_context()
    first = wait_for_certificate(proxy.port, "a.example.test", trusted)
    assert certificates.names_of(first) == ("*.example.test",)
    second = served_certificate(proxy.port, "b.example.test", trusted)
    assert second.serial_number == first.serial_number
    # One label only: a name two levels down is not this certificate's (the placeholder answers it).
    with pytest.raises(ssl.SSLCertVerificationError):
        served_certificate(proxy.port, "x.y.example.test", trusted)
    assert named.txt("_acme-challenge.example.test") == set()
    issued = next((cache).glob("*/certificates/*.example.test.pem"))
    assert stat.S_IMODE(issued.stat().st_mode) == 0o600


def test_dns01_exec_hook_publishes_and_removes_the_record(start_proxy, upstream, named, ca, tmp_path):
    calls = tmp_path / "hook-calls"
    hook = tmp_path / "dns-hook"
    # The hook is what a user would write for their DNS host: here it sends the RFC 2136 update itself.
    hook.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        import dns.query, dns.tsigkeyring, dns.update
        action, domain, name, value = sys.argv[1:]
        with open({str(calls)!r}, "a") as f:
            f.write(" ".join(sys.argv[1:]) + "\\n")
        keyring = dns.tsigkeyring.from_text({{{KEY_NAME!r}: ("hmac-sha256", {named.secret!r})}})
        update = dns.update.UpdateMessage({ZONE!r}, keyring=keyring)
        if action == "present":
            update.add(name + ".", 60, "TXT", '"' + value + '"')
        else:
            update.delete(name + ".", "TXT", '"' + value + '"')
        dns.query.tcp(update, "127.0.0.1", port={named.port}, timeout=5)
        """))
    hook.chmod(0o755)
    proxy = dns_proxy(start_proxy, upstream, ca, named, tmp_path / "acme", "h.example.test",
                      dns_provider="exec", dns_exec=str(hook))
    wait_for_certificate(proxy.port, "h.example.test", ca.trusting_context())
    proxy.wait_for_log(r"acme: h.example.test: obtained a certificate")
    lines = calls.read_text().splitlines()
    assert [line.split()[:3] for line in lines] == [["present", "h.example.test", "_acme-challenge.h.example.test"],
                                                   ["cleanup", "h.example.test", "_acme-challenge.h.example.test"]]
    assert lines[0].split()[3] == lines[1].split()[3]  # the same value, removed
    assert named.txt("_acme-challenge.h.example.test") == set()


def test_dns01_exec_hook_failing_is_logged_and_backed_off(start_proxy, upstream, named, ca, tmp_path):
    hook = tmp_path / "dns-hook"
    hook.write_text("#!/bin/sh\necho 'no API token for this zone' >&2\nexit 3\n")
    hook.chmod(0o755)
    proxy = dns_proxy(start_proxy, upstream, ca, named, tmp_path / "acme", "h.example.test",
                      dns_provider="exec", dns_exec=str(hook))
    failures = proxy.wait_for_log(r"acme: h.example.test: could not obtain a certificate", count=2, timeout=30)
    assert (f"dns_exec {hook} present h.example.test _acme-challenge.h.example.test: exited with status 3: "
            "no API token for this zone") in failures[0], failures[0]
    assert failures[0].endswith("next attempt in 1s") and failures[1].endswith("next attempt in 2s")


def test_dns01_refused_update_keeps_the_current_certificate_and_backs_off(start_proxy, upstream, named, pebble,
                                                                          tmp_path):
    ca = pebble(free_port(), dns=named.address, validity=3600)
    cache = tmp_path / "acme"
    first = dns_proxy(start_proxy, upstream, ca, named, cache, "a.example.test")
    trusted = ca.trusting_context()
    serial = wait_for_certificate(first.port, "a.example.test", trusted).serial_number
    first.stop()
    # A new CA on the same URL: it has no authorization it could reuse without asking the DNS.
    ca.stop_ca()
    ca.start()

    # Restarted with a wrong TSIG secret; the certificate is due for renewal 6s after its issuance.
    wrong = base64.b64encode(b"not the key named knows, 32 byte").decode()
    proxy = dns_proxy(start_proxy, upstream, ca, named, cache, "a.example.test", renew_before="3594s",
                      dns_tsig_secret=wrong)
    failures = proxy.wait_for_log(r"acme: a.example.test: could not obtain a certificate", count=2, timeout=30)
    assert (f"adding TXT _acme-challenge.a.example.test at {named.address}: the server rejected the TSIG "
            "signature") in failures[0], failures[0]
    assert "still serving the current certificate (valid until" in failures[0]
    assert failures[0].endswith("next attempt in 1s") and failures[1].endswith("next attempt in 2s")
    assert served_certificate(proxy.port, "a.example.test", trusted).serial_number == serial
    assert proxy.proc.poll() is None


def test_dns01_record_never_visible_gives_up_after_the_timeout_and_cleans_up(start_proxy, upstream, named, ca,
                                                                             tmp_path):
    calls = tmp_path / "hook-calls"
    hook = tmp_path / "dns-hook"
    # Says it published, publishes nothing: a DNS host whose API is slow to reach its servers.
    hook.write_text(f"#!/bin/sh\necho \"$1\" >> {calls}\n")
    hook.chmod(0o755)
    proxy = dns_proxy(start_proxy, upstream, ca, named, tmp_path / "acme", "p.example.test",
                      dns_provider="exec", dns_exec=str(hook), dns_propagation_timeout="2s")
    failure = proxy.wait_for_log(r"acme: p.example.test: could not obtain a certificate", timeout=30)[0]
    assert (f"TXT _acme-challenge.p.example.test was not visible at {named.address} within 2s "
            "(dns_propagation_timeout)") in failure, failure
    assert calls.read_text().splitlines()[:2] == ["present", "cleanup"]
    # The CA was never asked to validate (it would look once, and fail).
    assert "Starting 3 validations" not in ca.ca.log()
