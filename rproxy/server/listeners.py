"""TLS for the client side: the server context each gunicorn worker uses.

gunicorn asks its `ssl_context` hook once per worker and wraps every accepted
connection with the result. Ours:

- serves TLS 1.2 or newer with forward-secret AEAD ciphers only, and ALPN as
  gunicorn's settings ask;
- picks the certificate per connection from the client's SNI, out of a
  `CertificateStore` that notices when certificate files change on disk, so
  a renewed certificate is served without a restart while open connections
  keep the session they have;
- serves a pending TLS-ALPN-01 challenge's certificate to the CA's
  validation connections only, and closes them after the handshake
  (alpn_challenge.py);
- leaves the connections of plain-HTTP listeners (`http_bind`, the admin
  listener) unwrapped: gunicorn itself would put TLS on every listener;
- answers a plain HTTP request sent to the TLS port with a plain 400 as
  nginx does, and turns failed handshakes (port probes, scanners, clients
  that distrust the certificate) into a debug line rather than a traceback
  or a warning per connection.

The handshake runs in the worker's connection greenlet, not on accept, under
the worker's client_header_timeout.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from typing import TYPE_CHECKING, Any, Callable

from rproxy.config.addresses import listener_key
from rproxy.tls import acme_cache, alpn_challenge
from rproxy.tls.certificates import CertificateFiles, CertificateStore

if TYPE_CHECKING:
    from gunicorn.config import Config as GunicornConfig

    from rproxy.config import Config

MakeContext = Callable[[str, "str | None"], ssl.SSLContext]

log = logging.getLogger("rproxy.tls")

# TLS 1.2 suites: ECDHE key exchange (forward secrecy) and AEAD ciphers, as in
# Mozilla's "intermediate" profile. TLS 1.3 suites are all of that kind.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

_PLAIN_HTTP_ANSWER = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                      b"Content-Length: 55\r\nConnection: close\r\n\r\n"
                      b"400 Bad Request: this port speaks HTTPS, not plain HTTP")


def _alpn(conf: GunicornConfig) -> list[str]:
    protocols = getattr(conf, "http_protocols", None) or ["h1"]
    names = {"h2": "h2", "h1": "http/1.1"}
    return [names[p] for p in protocols if p in names]


def certificate_sources(config: Config, make_context: MakeContext
                        ) -> tuple[list[CertificateFiles], list[CertificateFiles]]:
    """The certificate pairs a config serves: (in the order their names take
    precedence, in the order a default is chosen). Names an [acme] section
    manages get its certificates; until they exist, the self-signed
    placeholder is the last resort."""
    files: list[CertificateFiles] = []
    if config.server.certfile:
        files.append(CertificateFiles(config.server.certfile, config.server.keyfile, make_context,
                                      "[server] certfile"))
    for name, section in config.certificates.items():
        files.append(CertificateFiles(section.certfile, section.keyfile, make_context,
                                      f"[certificate:{name}]"))
    managed: list[CertificateFiles] = []
    placeholder: list[CertificateFiles] = []
    if config.acme.domains:
        cache = acme_cache.CacheDir(config.acme)
        managed = [CertificateFiles(cache.certificate(domain), None, make_context, f"acme {domain}")
                   for domain in config.acme.domains]
        placeholder = [CertificateFiles(cache.placeholder, None, make_context, "acme placeholder",
                                        fallback=True)]
    return [*managed, *files, *placeholder], [*files, *managed, *placeholder]


def is_tls(environ: dict[str, Any]) -> bool:
    """Did this request come over TLS (as opposed to a plain listener)?"""
    return isinstance(environ.get("gunicorn.socket"), ssl.SSLSocket)


def ssl_context_hook(config: Config) -> Callable[..., ssl.SSLContext]:
    """gunicorn's `ssl_context` setting for this config."""
    def ssl_context(conf: GunicornConfig, default_ssl_context_factory: Any = None) -> ssl.SSLContext:
        return server_context(config, _alpn(conf))
    return ssl_context


def server_context(config: Config, alpn: list[str]) -> ssl.SSLContext:
    server = config.server
    minimum = VERSIONS[server.tls_min_version]

    def configure(context: ssl.SSLContext) -> ssl.SSLContext:
        context.minimum_version = minimum
        context.set_ciphers(CIPHERS)
        context.options |= ssl.OP_NO_RENEGOTIATION
        if alpn:
            context.set_alpn_protocols(alpn)
        return context

    def make_context(certfile: str, keyfile: str | None) -> ssl.SSLContext:
        # ssl.SSLContext is looked up now, in the worker, after gevent patched it.
        context = configure(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        context.load_cert_chain(certfile, keyfile)
        return context

    by_name, by_default = certificate_sources(config, make_context)
    store = CertificateStore(by_name, by_default)
    plain = {listener_key(bind) for bind in server.http_bind}
    if config.admin.bind:
        plain.add(listener_key(config.admin.bind))
    socket_class = _server_socket_class()
    challenges = None
    if "tls-alpn-01" in config.acme.challenges and config.acme.domains:
        challenges = alpn_challenge.Challenges(acme_cache.CacheDir(config.acme).tls_alpn, configure)

    class ServerContext(ssl.SSLContext):
        sslsocket_class = socket_class
        tls_alpn_challenges: alpn_challenge.Challenges | None = None  # looked at by ServerSocket.do_handshake

        # A plain listener's socket comes back unwrapped: not an SSLSocket.
        def wrap_socket(self, sock: socket.socket, server_side: bool = False,  # type: ignore[override]
                        do_handshake_on_connect: bool = True, **kwargs: Any) -> socket.socket:
            if server_side and _local_key(sock) in plain:
                return sock
            # The worker's connection handler does the handshake, under its head deadline.
            return super().wrap_socket(sock, server_side=server_side,
                                       do_handshake_on_connect=not server_side and do_handshake_on_connect,
                                       **kwargs)

    context = ServerContext(ssl.PROTOCOL_TLS_SERVER)
    configure(context)
    context.tls_alpn_challenges = challenges
    default = next((s for s in by_default if s.context is not None), None)
    if default is not None:
        context.load_cert_chain(default.certfile, default.keyfile)
    else:
        # Checked at start, so gone since: handshakes fail until a certificate is back.
        log.error("tls: no certificate could be loaded; TLS handshakes fail until one can")

    def choose_certificate(ssl_socket: ssl.SSLSocket | ssl.SSLObject, server_name: str | None,
                           current: ssl.SSLContext) -> None:
        # Called for every ClientHello, with server_name None when the client sent no SNI.
        if ssl_socket.context is not current:
            return None  # a TLS-ALPN-01 validation: its context was chosen before the handshake
        try:
            chosen = store.context_for(server_name)
            if chosen is not None and chosen is not current:
                ssl_socket.context = chosen
        except Exception:
            log.exception("tls: choosing the certificate for %r failed", server_name)
        return None

    context.sni_callback = choose_certificate
    return context


def _local_key(sock: socket.socket) -> int | str | None:
    try:
        name = sock.getsockname()
    except OSError:
        return None
    key: int | str = name[1] if isinstance(name, tuple) else name  # (host, port), or a Unix path
    return key


class _HandshakeFailed(ssl.SSLEOFError):
    """gunicorn closes a connection quietly on an SSL EOF error; a failed
    handshake deserves no more than that (and a debug line)."""


_socket_classes: dict[type[ssl.SSLSocket], type[ssl.SSLSocket]] = {}


def _server_socket_class() -> type[ssl.SSLSocket]:
    """The SSLSocket class of server connections, made in the worker from
    gevent's SSLSocket once gevent has patched the ssl module. The time a
    handshake may take is the worker's client_header_timeout, which runs
    from the accept to the end of the first request head (as in nginx)."""
    base = ssl.SSLSocket
    cls = _socket_classes.get(base)
    if cls is not None:
        return cls

    class ServerSocket(ssl.SSLSocket):  # gevent's, once it patched ssl: read at this call
        def do_handshake(self, *args: Any, **kwargs: Any) -> None:
            peer = _peer(self)
            challenges = getattr(self.context, "tls_alpn_challenges", None)
            if challenges is not None and (pending := challenges.pending()):
                # Before the TLS layer reads the ClientHello: the CA's validation
                # gets the challenge's context (certificate and ALPN) instead.
                chosen = challenges.context_for(self, pending)
                if chosen is not None:
                    self.context = chosen
            try:
                super().do_handshake(*args, **kwargs)
            except ssl.SSLError as e:
                reason = e.reason or e.strerror or str(e)
                if e.reason == "HTTP_REQUEST":
                    _answer_plain_http(self)
                    log.debug("tls: %s sent plain HTTP to the TLS port: answered 400", peer)
                else:
                    log.debug("tls: handshake with %s failed: %s", peer, reason)
                raise _HandshakeFailed(ssl.SSL_ERROR_EOF, f"TLS handshake failed: {reason}") from None
            if self.selected_alpn_protocol() == alpn_challenge.PROTOCOL:
                # RFC 8737 §3: a validation connection ends with its handshake
                # (only a challenge context offers this protocol).
                log.debug("tls: answered the TLS-ALPN-01 validation from %s", peer)
                raise _HandshakeFailed(ssl.SSL_ERROR_EOF, "TLS-ALPN-01 validation answered")

    _socket_classes[base] = ServerSocket
    return ServerSocket


def handshake_done(sock: socket.socket) -> bool:
    """False for a TLS connection whose handshake has not completed."""
    return not isinstance(sock, ssl.SSLSocket) or sock.version() is not None


def _peer(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return "a client"


def _answer_plain_http(sock: socket.socket) -> None:
    """Answer with plain bytes under the failed TLS layer, then close
    gracefully: stop sending, read what the client still sends (briefly), so
    that the close does not reset the connection before the answer is read."""
    try:
        raw = socket.socket(sock.family, sock.type, fileno=os.dup(sock.fileno()))
    except OSError:
        return
    deadline = time.monotonic() + 1.0
    try:
        raw.settimeout(1.0)
        raw.sendall(_PLAIN_HTTP_ANSWER)
        raw.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            raw.settimeout(left)
            if not raw.recv(65536):
                break
    except OSError:
        pass
    finally:
        raw.close()
