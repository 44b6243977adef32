"""TLS towards https:// upstream servers: one client context per upstream.

Verification is on unless `tls_verify = no`: the server's chain against
`ca_file` or the system's CAs, and its name against `tls_name` (or the host
written in `servers`), which is also sent as SNI (never for an IP address,
RFC 6066 3). A client certificate is presented to servers that ask (mTLS).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rproxy.config.sections import UpstreamConfig


def client_context(config: UpstreamConfig) -> ssl.SSLContext:
    """The context every connection to this upstream's https:// servers uses.
    Raises ssl.SSLError or OSError when a file cannot be used."""
    context = ssl.create_default_context(cafile=config.ca_file)  # system CAs when None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not config.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if config.client_certfile:
        context.load_cert_chain(config.client_certfile, config.client_keyfile)
    return context


def pool_options(config: UpstreamConfig, host: str, context: ssl.SSLContext) -> dict[str, Any]:
    """urllib3 HTTPSConnectionPool arguments for one server."""
    return {"ssl_context": context, "server_hostname": config.tls_name or host,
            "cert_reqs": context.verify_mode}


def verification_failure(error: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error behind `error`, if that is what it is."""
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, ssl.SSLCertVerificationError):
            return error
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def tls_failure(error: BaseException | None) -> ssl.SSLError | None:
    """Any TLS error behind `error` (a handshake refused, a client
    certificate missing...)."""
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, ssl.SSLError):
            return error
        error = error.__cause__ or error.__context__
        seen += 1
    return None
