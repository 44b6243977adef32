"""The ClientHello parser TLS-ALPN-01 relies on, fed real ClientHello bytes
from Python's ssl client (made in memory, no sockets) and broken variants."""

import ssl

import pytest

from rproxy.tls import clienthello
from rproxy.tls.clienthello import Incomplete, Malformed, parse


def real_client_hello(server_name=None, alpn=None, maximum=None) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    if maximum:
        context.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def records(message: bytes, size: int) -> bytes:
    """`message` (a handshake message) split into records of `size` bytes."""
    out = b""
    for i in range(0, len(message), size):
        chunk = message[i:i + size]
        out += b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
    return out


def test_acme_validation_offer_is_seen():
    hello = parse(real_client_hello("a.test", ["acme-tls/1"]))
    assert hello.server_name == "a.test" and hello.alpn == ("acme-tls/1",)


def test_browser_like_offer_lists_every_protocol_in_order():
    hello = parse(real_client_hello("www.Example.COM", ["h2", "http/1.1", "acme-tls/1"]))
    assert hello.server_name == "www.example.com"
    assert hello.alpn == ("h2", "http/1.1", "acme-tls/1")


def test_client_without_alpn_or_sni():
    assert parse(real_client_hello("a.test")) == clienthello.ClientHello("a.test", None)
    assert parse(real_client_hello()) == clienthello.ClientHello(None, None)


def test_tls_1_2_client_hello():
    hello = parse(real_client_hello("a.test", ["acme-tls/1"], maximum=ssl.TLSVersion.TLSv1_2))
    assert hello.alpn == ("acme-tls/1",)


def test_client_hello_split_over_records_is_reassembled():
    data = real_client_hello("a.test", ["acme-tls/1"])
    message = data[5:]
    assert parse(records(message, 100)) == parse(data)


def test_every_truncation_asks_for_more():
    data = real_client_hello("a.test", ["acme-tls/1"])
    for n in range(len(data)):
        with pytest.raises(Incomplete):
            parse(data[:n])
    split = records(data[5:], 64)
    for n in range(0, len(split), 7):
        with pytest.raises(Incomplete):
            parse(split[:n])


def test_bytes_after_the_client_hello_are_not_looked_at():
    data = real_client_hello("a.test", ["h2"])
    assert parse(data + b"\x17\x03\x03garbage").alpn == ("h2",)


@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
    b"\x16\x02\x00\x00\x05hello",                      # SSL 2-ish version
    b"\x16\x03\x01\x00\x00",                           # empty record
    b"\x16\x03\x01\x40\x01" + b"\x00" * 10,            # record over 2^14
    b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",           # a ServerHello
    b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",       # body too short for version and random
    b"\x00" * 100,
])
def test_garbage_is_malformed(data):
    with pytest.raises(Malformed):
        parse(data)


def test_oversized_client_hello_is_refused_without_waiting_for_it():
    header = b"\x01" + (40000).to_bytes(3, "big")
    data = records(header + b"\x00" * 16000, 16000)[:clienthello.MAX_SIZE]
    with pytest.raises(Malformed, match="over"):
        parse(data + b"\x16\x03\x01\x3e\x80")


def corrupt(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1
    return data.replace(old, new)


def test_inconsistent_lengths_inside_are_malformed():
    data = real_client_hello("a.test", ["acme-tls/1"])
    # The protocol name claims 11 bytes where 10 are.
    with pytest.raises(Malformed):
        parse(corrupt(data, b"\x0aacme-tls/1", b"\x0bacme-tls/1"))
    # An empty protocol name.
    with pytest.raises(Malformed):
        parse(corrupt(data, b"\x00\x0b\x0aacme-tls/1", b"\x00\x0b\x00acme-tls/1"))
    # A server name that is not ASCII.
    with pytest.raises(Malformed):
        parse(corrupt(data, b"a.test", b"\xe4.test"))


def test_duplicate_extension_is_malformed():
    data = real_client_hello("a.test", ["h2"])
    # The ALPN extension (type 16) relabelled as a second server_name (type 0).
    alpn = b"\x00\x10\x00\x05\x00\x03\x02h2"
    with pytest.raises(Malformed, match="twice"):
        parse(corrupt(data, alpn, b"\x00\x00" + alpn[2:]))
