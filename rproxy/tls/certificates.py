"""Certificates on disk: checking them, the names they serve, and keeping a
worker's copy current.

A certificate is a PEM chain (leaf first) and its private key, in two files.
`check_pair` is what start-up and `rproxy check` run: it says precisely what
is wrong with a pair. `CertificateStore` is what a worker's TLS handshakes
ask: the context for a server name, rebuilt when the files change on disk,
which is how a renewed certificate reaches every worker without a restart.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger("rproxy.tls")

# How often a worker looks at the files: cheap (two stat calls per certificate)
# and soon enough for a renewal that lands a few weeks before expiry.
CHECK_INTERVAL = 1.0


class CertificateProblem(ValueError):
    """What is wrong with a certificate pair, and which of the two files is at fault."""

    def __init__(self, key: str, problem: str):
        super().__init__(problem)
        self.key = key


@dataclass(frozen=True)
class CertificateInfo:
    names: tuple[str, ...]
    not_after: datetime.datetime
    not_before: datetime.datetime


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CertificateProblem(key, f"{path!r} does not exist") from None
    except OSError as e:
        raise CertificateProblem(key, f"cannot read {path!r}: {e.strerror or e}") from None


def parse_chain(data: bytes, where: str, key: str = "certfile") -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        chain = []
    if not chain:
        raise CertificateProblem(key, f"{where} holds no PEM certificate")
    return chain


def load_chain(path: str, key: str = "certfile") -> list[x509.Certificate]:
    return parse_chain(_read(path, key), repr(path), key)


def load_key(path: str, key: str = "keyfile"):
    data = _read(path, key)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateProblem(key, f"{path!r} is an encrypted key; rproxy needs it unencrypted "
                                      "(keep it readable by rproxy only)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateProblem(key, f"{path!r} holds no PEM private key") from None


def names_of(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS names a certificate serves: its SAN, else its common name."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names: list[str | bytes] = list(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(str(n).lower().rstrip(".") for n in names))


def _public(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def belongs_to(key, cert: x509.Certificate) -> bool:
    """Is `key` the private key of `cert`?"""
    return _public(key.public_key()) == _public(cert.public_key())


def check_pair(certfile: str, keyfile: str, now: datetime.datetime | None = None) -> CertificateInfo:
    """Raise CertificateProblem unless `certfile` is a PEM chain whose first
    certificate is valid now and `keyfile` its unencrypted private key."""
    leaf = load_chain(certfile)[0]
    key = load_key(keyfile)
    if not belongs_to(key, leaf):
        raise CertificateProblem("keyfile", f"{keyfile!r} is not the private key of the certificate "
                                            f"in {certfile!r}")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if leaf.not_valid_after_utc <= now:
        raise CertificateProblem("certfile", f"the certificate in {certfile!r} expired on "
                                             f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if leaf.not_valid_before_utc > now:
        raise CertificateProblem("certfile", f"the certificate in {certfile!r} is not valid before "
                                             f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    return CertificateInfo(names_of(leaf), leaf.not_valid_after_utc, leaf.not_valid_before_utc)


def name_matches(server_name: str, pattern: str) -> bool:
    """RFC 6125: a wildcard stands for exactly one left-most label."""
    if pattern.startswith("*."):
        head, dot, rest = server_name.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:]
    return server_name == pattern


def write_private(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` atomically with `data`: a reader sees the old file or
    the new one, never half of it. Created with `mode` from the start."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def new_key() -> ec.EllipticCurvePrivateKey:
    """P-256: what Caddy and certbot default to, and quick to make."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_placeholder(path: str, names: tuple[str, ...], days: int = 365) -> None:
    """A self-signed certificate (and its key, in the same file) served for
    names whose real certificate is not there yet, as Traefik does: TLS
    works, and browsers say plainly that the certificate is not trusted."""
    try:
        chain = load_chain(path)
        if chain[0].not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc) > \
                datetime.timedelta(days=7) and set(names_of(chain[0])) == set(names):
            return
    except CertificateProblem:
        pass
    key = new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rproxy placeholder certificate")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256()))
    write_private(path, key_pem(key) + cert.public_bytes(serialization.Encoding.PEM))


def _signature(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class CertificateFiles:
    """One certificate pair on disk and the context made from it, remade
    when either file changes (replacing a file by rename changes its inode).

    A pair that fails to load leaves the context it had in place. Tools
    that replace the certificate and the key one after the other (certbot
    moves two symlinks) leave a moment when they do not match: a failure is
    tried again for a few checks before it is reported."""

    RETRIES = 3

    def __init__(self, certfile: str, keyfile: str | None, make_context: Callable, label: str,
                 fallback: bool = False):
        self.certfile, self.keyfile = certfile, keyfile or certfile
        self.make_context = make_context
        self.label = label
        # A fallback's names match only when no other certificate's do, wildcards included.
        self.fallback = fallback
        self.context = None
        self.names: tuple[str, ...] = ()
        self.not_after: datetime.datetime | None = None
        self._signature: tuple = ()
        self._failures = 0
        self.refresh()

    def refresh(self) -> bool:
        """Reload when the files changed; True when the context changed."""
        signature = (_signature(self.certfile), _signature(self.keyfile))
        if signature == self._signature:
            return False
        self._signature = signature
        if signature[0] is None:
            return False  # not there (yet): an ACME certificate before its first issuance
        try:
            leaf = load_chain(self.certfile)[0]
            context = self.make_context(self.certfile, self.keyfile)
        except (CertificateProblem, OSError, ValueError) as e:
            # ssl.SSLError is an OSError: a key that does not match lands here.
            self._failures += 1
            if self._failures < self.RETRIES:
                self._signature = ()  # look again at the next check
            else:
                self._failures = 0
                log.warning("tls: %s: cannot load %s (%s)%s", self.label, self.certfile, e,
                            "; still serving the certificate loaded before" if self.context else "")
            return False
        self._failures = 0
        renewed = self.context is not None
        self.context, self.names, self.not_after = context, names_of(leaf), leaf.not_valid_after_utc
        if renewed:
            log.info("tls: %s: loaded the new certificate from %s (%s, valid until %s UTC)",
                     self.label, self.certfile, " ".join(self.names), f"{self.not_after:%Y-%m-%d %H:%M}")
        return True


class CertificateStore:
    """Which context a handshake gets: the certificate whose names match the
    client's SNI (exact names first, then wildcards, then fallbacks' names),
    else the default one.

    `by_name` lists the pairs in the order their names take precedence;
    `by_default` the order in which a default is chosen."""

    def __init__(self, by_name: list[CertificateFiles], by_default: list[CertificateFiles],
                 check_interval: float = CHECK_INTERVAL):
        self.by_name, self.by_default = by_name, by_default
        self.sources = list(dict.fromkeys([*by_name, *by_default]))
        self.check_interval = check_interval
        self._next_check = time.monotonic() + check_interval
        self._index()
        from rproxy.observability import metrics
        metrics.serve_certificates(self)

    def expiries(self) -> dict[str, float]:
        """Each name served, with the expiry (timestamp) of its certificate,
        the placeholder left out (it stands for a missing certificate)."""
        out: dict[str, float] = {}
        for source in self.by_name:
            if source.context is not None and not source.fallback and source.not_after is not None:
                for name in source.names:
                    out.setdefault(name, source.not_after.timestamp())
        return out

    def _index(self) -> None:
        exact: dict[str, ssl.SSLContext] = {}
        wildcards: list[tuple[str, ssl.SSLContext]] = []
        fallbacks: dict[str, ssl.SSLContext] = {}
        for source in self.by_name:
            if source.context is None:
                continue
            for name in source.names:
                if source.fallback:
                    fallbacks.setdefault(name, source.context)
                elif name.startswith("*."):
                    wildcards.append((name, source.context))
                else:
                    exact.setdefault(name, source.context)
        self._exact, self._wildcards, self._fallbacks = exact, wildcards, fallbacks
        self.default = next((s.context for s in self.by_default if s.context is not None), None)

    def refresh(self) -> None:
        if any([source.refresh() for source in self.sources]):
            self._index()

    def context_for(self, server_name: str | None):
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.check_interval
            self.refresh()
        if server_name:
            name = server_name.lower().rstrip(".")
            context = self._exact.get(name)
            if context is not None:
                return context
            for pattern, context in self._wildcards:
                if name_matches(name, pattern):
                    return context
            context = self._fallbacks.get(name)
            if context is not None:
                return context
        return self.default
