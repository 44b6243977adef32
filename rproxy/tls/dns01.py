"""DNS-01: publishing the TXT record an ACME DNS-01 challenge asks for, and
waiting until the zone's authoritative servers answer with it.

A provider does two things for a name: `present` a TXT value, and `cleanup`
that same value (never the whole record set, so that two orders for the same
name at once do not remove each other's answer). Two providers:

- `Rfc2136`: TSIG-signed dynamic updates (RFC 2136, RFC 8945) sent to
  `[acme] dns_server`, the zone taken from `dns_zone` or found by asking that
  server for the name's SOA.
- `Exec`: `dns_exec present|cleanup DOMAIN TXT_NAME VALUE`, for any DNS host
  with an API or a CLI of its own; exit status 0 is success.

`wait_until_visible` asks the authoritative servers (dns_server when set,
else the zone's NS) until each answers the value: a CA asking before then
would fail the validation, and a failed validation counts against the
account's limits at Let's Encrypt.
"""

from __future__ import annotations

import subprocess
import time
from typing import Callable, Protocol

RECORD_TTL = 60  # short: the record lives for one validation
QUERY_TIMEOUT = 5.0
EXEC_TIMEOUT = 120.0
POLL = 1.0


class DnsProblem(RuntimeError):
    """A TXT record could not be published, removed or seen; the message says why."""


class Provider(Protocol):
    def present(self, domain: str, name: str, value: str) -> None: ...

    def cleanup(self, domain: str, name: str, value: str) -> None: ...


def txt_name(domain: str) -> str:
    """Where the answer for `domain` goes (RFC 8555 §8.4); a wildcard's is its base name's."""
    return "_acme-challenge." + domain.removeprefix("*.")


def provider_for(config) -> Provider:
    """The provider `[acme] dns_provider` names (the config loader has checked its keys)."""
    if config.dns_provider == "rfc2136":
        return Rfc2136(config.dns_server, config.dns_tsig_key_name, config.dns_tsig_algorithm,
                       config.dns_tsig_secret, config.dns_zone)
    if config.dns_provider == "exec":
        return Exec(config.dns_exec)
    raise DnsProblem("dns-01 needs [acme] dns_provider")


def _server(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Rfc2136:
    def __init__(self, server: tuple[str, int], key_name: str, algorithm: str, secret: str, zone: str = ""):
        import dns.tsigkeyring
        self.server, self.zone = server, zone
        self.key_name = key_name
        self.keyring = dns.tsigkeyring.from_text({key_name: (algorithm, secret)})

    def present(self, domain: str, name: str, value: str) -> None:
        self._update(name, value, add=True)

    def cleanup(self, domain: str, name: str, value: str) -> None:
        self._update(name, value, add=False)

    def _update(self, name: str, value: str, add: bool) -> None:
        import dns.exception
        import dns.query
        import dns.rcode
        import dns.update
        what = f"{'adding' if add else 'removing'} TXT {name} at {_server(self.server)}"
        try:
            zone = self.zone or zone_of(name, self.server)
            update = dns.update.UpdateMessage(zone, keyring=self.keyring)
            if add:
                update.add(name + ".", RECORD_TTL, "TXT", f'"{value}"')
            else:
                update.delete(name + ".", "TXT", f'"{value}"')
            response = dns.query.tcp(update, self.server[0], port=self.server[1], timeout=QUERY_TIMEOUT)
        except dns.exception.DNSException as e:
            raise DnsProblem(f"{what}: {_dns_error(e, self.key_name)}") from None
        except OSError as e:
            raise DnsProblem(f"{what}: {e.strerror or e}") from None
        if response.rcode() != dns.rcode.NOERROR:
            raise DnsProblem(f"{what}: the server answered {dns.rcode.to_text(response.rcode())} "
                             f"(does key {self.key_name} have update rights for zone {zone}?)")


def _dns_error(error: Exception, key_name: str) -> str:
    import dns.exception
    import dns.tsig
    if isinstance(error, dns.tsig.PeerError):
        return (f"the server rejected the TSIG signature ({type(error).__name__}): "
                f"are dns_tsig_key_name ({key_name}), dns_tsig_algorithm and dns_tsig_secret "
                f"those the server knows?")
    if isinstance(error, dns.exception.Timeout):
        return "no answer (timeout)"
    return f"{type(error).__name__}: {error}"


def zone_of(name: str, server: tuple[str, int] | None = None) -> str:
    """The zone `name` belongs to, by SOA: asking `server`, else the system's resolver."""
    import dns.resolver
    resolver = dns.resolver.Resolver(configure=server is None)
    if server is not None:
        resolver.nameservers, resolver.port = [server[0]], server[1]
    resolver.lifetime = QUERY_TIMEOUT
    return dns.resolver.zone_for_name(name, resolver=resolver).to_text(omit_final_dot=True)


def authoritative_servers(name: str) -> list[tuple[str, int]]:
    """The addresses of the NS of `name`'s zone, found through the system's resolver."""
    import dns.resolver
    zone = zone_of(name)
    servers = []
    for ns in dns.resolver.resolve(zone, "NS", lifetime=QUERY_TIMEOUT):
        for kind in ("A", "AAAA"):
            try:
                servers += [(a.address, 53) for a in dns.resolver.resolve(ns.target, kind, lifetime=QUERY_TIMEOUT)]
            except dns.resolver.NoAnswer:
                pass
    return servers


def answers(server: tuple[str, int], name: str) -> set[str]:
    """The TXT values `server` answers for `name` (empty when none, or no answer)."""
    import dns.exception
    import dns.message
    import dns.query
    import dns.rdatatype
    query = dns.message.make_query(name + ".", "TXT")
    try:
        response = dns.query.udp(query, server[0], port=server[1], timeout=QUERY_TIMEOUT)
    except (dns.exception.DNSException, OSError):
        return set()
    return {b"".join(rdata.strings).decode("ascii", "replace")
            for rrset in response.answer if rrset.rdtype == dns.rdatatype.TXT for rdata in rrset}


def wait_until_visible(records: list[tuple[str, str]], servers: list[tuple[str, int]] | None,
                       timeout: float, sleep: Callable[[float], None], alive: Callable[[], bool]) -> None:
    """Return once every server answers every (name, value); DnsProblem after `timeout`.
    `servers` None: each name's zone's NS, found through the system's resolver."""
    import dns.exception
    deadline = time.monotonic() + timeout
    pending = list(records)
    while True:
        for name, value in list(pending):
            try:
                where = servers if servers is not None else authoritative_servers(name)
            except dns.exception.DNSException as e:
                raise DnsProblem(f"cannot find the authoritative servers of {name}: {e}") from None
            if where and all(value in answers(server, name) for server in where):
                pending.remove((name, value))
        if not pending:
            return
        if time.monotonic() >= deadline or not alive():
            name, _ = pending[0]
            asked = " ".join(_server(s) for s in servers) if servers is not None else "its zone's NS"
            raise DnsProblem(f"TXT {name} was not visible at {asked} within {timeout:g}s "
                             "(dns_propagation_timeout)")
        sleep(POLL)


class Exec:
    def __init__(self, command: str):
        self.command = command

    def present(self, domain: str, name: str, value: str) -> None:
        self._run("present", domain, name, value)

    def cleanup(self, domain: str, name: str, value: str) -> None:
        self._run("cleanup", domain, name, value)

    def _run(self, action: str, domain: str, name: str, value: str) -> None:
        what = f"dns_exec {self.command} {action} {domain} {name}"
        try:
            done = subprocess.run([self.command, action, domain, name, value], stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=EXEC_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise DnsProblem(f"{what}: still running after {EXEC_TIMEOUT:g}s; stopped") from None
        except OSError as e:
            raise DnsProblem(f"{what}: cannot run: {e.strerror or e}") from None
        if done.returncode != 0:
            said = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
            raise DnsProblem(f"{what}: exited with status {done.returncode}"
                             + (f": {said[-1].strip()}" if said else ""))
