"""TLS-ALPN-01 (RFC 8737): the CA validates a domain on the TLS port itself.

The managing worker writes, per domain with a pending challenge, a
self-signed certificate carrying the key authorization's digest (with its
key, in one file) into cache_dir; every worker serves it, so whichever one
the CA's validation connection reaches answers it.

A validation connection is a ClientHello offering exactly the protocol
`acme-tls/1` for the domain's name. The certificate has to be chosen before
the TLS layer knows the ALPN offer, so while a challenge is pending the
ClientHello is peeked at on the raw socket (bounded in size and time) and
parsed (clienthello.py). When no challenge is pending, a connection costs one
stat of the directory and nothing is peeked. Every other client, during a
challenge too, gets the ordinary certificate.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import socket
import ssl
import time
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID, ObjectIdentifier

from rproxy.tls import certificates, clienthello

log = logging.getLogger("rproxy.tls")

PROTOCOL = "acme-tls/1"
# RFC 8737 §3: the critical acmeIdentifier extension, id-pe 31.
ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")
# How long a pending challenge lets a client take to send its ClientHello
# before it is handed to the ordinary TLS path (which has its own deadline).
PEEK_TIMEOUT = 2.0
_PEEK_PAUSE = 0.02
# A directory modified this recently may change again within the same
# timestamp tick: it is listed again rather than trusted by its mtime.
_RACY = 1.0


def challenge_certificate(domain: str, key_authorization: str) -> bytes:
    """Key and certificate (PEM, one file) answering the challenge for `domain`."""
    key = certificates.new_key()
    digest = hashlib.sha256(key_authorization.encode()).digest()
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rproxy ACME TLS-ALPN-01 challenge")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
            # The extension's value is the DER OCTET STRING of the SHA-256 digest.
            .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest), critical=True)
            .sign(key, hashes.SHA256()))
    return certificates.key_pem(key) + cert.public_bytes(serialization.Encoding.PEM)


class Challenges:
    """The TLS-ALPN-01 challenges pending in `directory` (one `DOMAIN.pem` each),
    as a worker's TLS listener sees them."""

    def __init__(self, directory: str, configure: Callable[[ssl.SSLContext], ssl.SSLContext]) -> None:
        self.directory = directory
        self.configure = configure  # applies the server's TLS versions and ciphers
        self._mtime: int | None = None
        self._names: frozenset[str] = frozenset()

    def pending(self) -> frozenset[str]:
        """The domains with a pending challenge (one stat when nothing changed)."""
        try:
            mtime = os.stat(self.directory).st_mtime_ns
        except OSError:
            return frozenset()
        if mtime != self._mtime or time.time_ns() - mtime < _RACY * 1e9:
            try:
                names = os.listdir(self.directory)
            except OSError:
                return frozenset()
            self._mtime = mtime
            self._names = frozenset(n[:-4] for n in names if n.endswith(".pem") and not n.startswith("."))
        return self._names

    def context_for(self, sock, names: frozenset[str]) -> ssl.SSLContext | None:
        """The challenge context for a connection that is a validation of one of `names`."""
        hello = peek_client_hello(sock)
        if hello is None or hello.alpn != (PROTOCOL,) or hello.server_name not in names:
            return None
        path = os.path.join(self.directory, f"{hello.server_name}.pem")
        try:
            context = self.configure(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
            context.load_cert_chain(path)
        except (OSError, ValueError) as e:  # answered and removed meanwhile
            log.debug("tls: no TLS-ALPN-01 certificate for %s: %s", hello.server_name, e)
            return None
        context.set_alpn_protocols([PROTOCOL])
        log.debug("tls: TLS-ALPN-01 validation of %s from %s", hello.server_name, _peer(sock))
        return context


def peek_client_hello(sock, timeout: float = PEEK_TIMEOUT) -> clienthello.ClientHello | None:
    """The ClientHello the client on `sock` (a TLS socket before its handshake)
    sent, left unread for the TLS layer; None when it is no ClientHello or
    does not arrive within `timeout`."""
    try:
        # The TCP socket under the TLS layer, as a (cooperative) socket of its own.
        raw = socket.socket(sock.family, sock.type, fileno=os.dup(sock.fileno()))
    except OSError:
        return None
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            raw.settimeout(left)
            data = raw.recv(clienthello.MAX_SIZE, socket.MSG_PEEK)
            if not data:
                return None
            try:
                return clienthello.parse(data)
            except clienthello.Incomplete:
                # The rest is on its way: peeking returns what is there at once.
                time.sleep(_PEEK_PAUSE)
            except clienthello.Malformed:
                return None
    except OSError:  # timeouts included
        return None
    finally:
        raw.close()  # the duplicate only: the connection stays open
    return None


def _peer(sock) -> str:
    try:
        return str(sock.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return "a client"
