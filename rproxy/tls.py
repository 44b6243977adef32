"""TLS for the client side: the server context gunicorn's workers use.

TLS 1.2 at least, Python's modern cipher defaults, ALPN as gunicorn's
settings ask. The handshake is left to the worker's connection handler
rather than done on accept, so that a client that connects and hangs up (a
port probe, a health check) is a debug line, not a traceback.
"""

from __future__ import annotations

import ssl


def _alpn(conf) -> list[str]:
    protocols = getattr(conf, "http_protocols", None) or ["h1"]
    names = {"h2": "h2", "h1": "http/1.1"}
    return [names[p] for p in protocols if p in names]


def ssl_context(conf, default_ssl_context_factory=None) -> ssl.SSLContext:
    """gunicorn's `ssl_context` hook."""
    # ssl.SSLContext is looked up now, in the worker, after gevent patched it.
    class DeferredHandshakeContext(ssl.SSLContext):
        def wrap_socket(self, sock, server_side=False, do_handshake_on_connect=True, **kwargs):
            return super().wrap_socket(sock, server_side=server_side,
                                       do_handshake_on_connect=not server_side and do_handshake_on_connect,
                                       **kwargs)

    context = DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(conf.certfile, conf.keyfile)
    context.set_alpn_protocols(_alpn(conf))
    return context
