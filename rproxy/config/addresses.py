"""Config values that name places: addresses, ports, listeners, host and
domain names, networks, URLs. Parsers as in values.py: a raw INI string in,
the value out, or ValueError saying what is wrong."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from rproxy.values import words


def networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Addresses or CIDR networks, e.g. '127.0.0.1 ::1 10.0.0.0/8'."""
    result = []
    for word in words(raw):
        try:
            result.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise ValueError(f"{word!r} is not an IP address or network") from None
    return tuple(result)


_HOST_RE = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?")


def host_name(raw: str) -> str:
    """A host name or IP address, lower-cased; empty allowed."""
    value = raw.strip().lower().rstrip(".")
    if not value:
        return ""
    try:
        return str(ipaddress.ip_address(value.strip("[]")))
    except ValueError:
        pass
    if value.startswith("*") or not _HOST_RE.fullmatch(value):
        raise ValueError(f"{raw!r} is not a host name")
    return value


def host_patterns(raw: str) -> tuple[str, ...]:
    """Host names, exact or '*.example.com', lower-cased."""
    result = []
    for word in words(raw.lower()):
        if not _HOST_RE.fullmatch(word):
            raise ValueError(f"{word!r} is not a host name or *.wildcard")
        result.append(word.rstrip("."))
    return tuple(result)


@dataclass(frozen=True)
class ServerAddress:
    """One upstream server: where it is and how much of the traffic it takes."""

    scheme: str
    host: str
    port: int
    weight: int = 1

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}"


_ADDR_RE = re.compile(r"(?:(https?)://)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(?::(\d+))?/?")


def servers(raw: str) -> tuple[ServerAddress, ...]:
    """'127.0.0.1:9001 http://b:9002 weight=2 https://c' -> addresses."""
    result: list[ServerAddress] = []
    for word in words(raw):
        if word.startswith("weight="):
            if not result:
                raise ValueError(f"{word!r} must follow the server it weighs")
            weight = word[len("weight="):]
            if not weight.isdigit() or int(weight) < 1:
                raise ValueError(f"{word!r}: weight must be a whole number of 1 or more")
            last = result.pop()
            result.append(ServerAddress(last.scheme, last.host, last.port, int(weight)))
            continue
        match = _ADDR_RE.fullmatch(word)
        if not match:
            raise ValueError(f"{word!r} is not host:port or http(s)://host:port")
        scheme = (match.group(1) or "http").lower()
        host = match.group(2).strip("[]")
        port = int(match.group(3) or (443 if scheme == "https" else 80))
        if not 0 < port < 65536:
            raise ValueError(f"{word!r}: port must be 1 to 65535")
        result.append(ServerAddress(scheme, host, port))
    if not result:
        raise ValueError("names no server")
    return tuple(result)


def host_port(raw: str) -> tuple[str, int]:
    """'127.0.0.1:9180' or '[::1]:9180' -> (host, port)."""
    match = re.fullmatch(r"\[?([0-9A-Za-z.:-]+?)\]?:(\d{1,5})", raw.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"{raw!r} is not host:port")
    return match.group(1), int(match.group(2))


def ip_port(raw: str) -> tuple[str, int]:
    """'192.0.2.1', '192.0.2.1:5353', '2001:db8::1' or '[2001:db8::1]:5353' -> (address, port), port 53 by default."""
    value = raw.strip()
    bracketed = re.fullmatch(r"\[([^\]]*)\](?::(\d{1,5}))?", value)
    if bracketed:
        host, number = bracketed.group(1), bracketed.group(2) or "53"
    elif value.count(":") == 1:
        host, _, number = value.partition(":")
    else:
        host, number = value, "53"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{raw!r} is not an IP address with an optional port (192.0.2.1:53, "
                         "[2001:db8::1]:53)") from None
    if not number.isdigit() or not 0 < int(number) < 65536:
        raise ValueError(f"{raw!r}: the port must be 1 to 65535")
    return host, int(number)


def dns_name(raw: str) -> str:
    """A DNS name such as a zone or a TSIG key's (underscores allowed, unlike host names); empty allowed."""
    value = raw.strip().lower().rstrip(".")
    if value and not all(re.fullmatch(r"[a-z0-9_-]{1,63}", label) for label in value.split(".")):
        raise ValueError(f"{raw!r} is not a DNS name (labels of letters, digits, '-' and '_')")
    return value


def port(raw: str) -> int:
    value = raw.strip()
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"{raw!r} is not a port number (1-65535)")
    return int(value)


def listener_key(bind: str) -> int | str | None:
    """What tells a listener's connections apart: its TCP port, or its Unix
    socket path (None for an inherited fd://)."""
    from gunicorn.util import parse_address
    try:
        address = parse_address(bind.strip())
    except RuntimeError as e:
        raise ValueError(f"{bind!r} is not host:port, [ipv6]:port, unix:/path or fd://N "
                         f"({str(e).rstrip('.')})") from None
    if isinstance(address, tuple):
        if not 0 <= address[1] <= 65535:
            raise ValueError(f"{bind!r}: the port must be 0 to 65535")
        return address[1]
    if isinstance(address, int):
        return None
    if not address:
        raise ValueError(f"{bind!r}: a unix: address needs a path")
    return address


def bind_addresses(raw: str) -> tuple[str, ...]:
    """Listen addresses, gunicorn syntax: host:port, [::1]:port, unix:/path, fd://N."""
    result = words(raw)
    if not result:
        raise ValueError("names no address to listen on")
    for bind in result:
        listener_key(bind)
    return result


def listeners(raw: str) -> tuple[str, ...]:
    """Listen addresses, gunicorn syntax: host:port, [::1]:port, unix:/path."""
    result = words(raw)
    for bind in result:
        if listener_key(bind) is None:
            raise ValueError(f"{bind!r}: give a host:port or unix:/path here")
    return result


def url(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise ValueError(f"{raw!r} is not an http(s):// URL")
    return value


def domain_names(raw: str) -> tuple[str, ...]:
    """Host names, and wildcards of one label (`*.example.com`)."""
    names = host_patterns(raw)
    for name in names:
        if re.fullmatch(r"[0-9.]+", name):
            raise ValueError(f"{name!r} is an IP address, not a domain name")
    if not names:
        raise ValueError("names no domain")
    return names
