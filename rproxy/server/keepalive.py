"""A client connection's life in the worker: TLS handshake, HTTP/2 or
HTTP/1.x, and the HTTP/1.x keep-alive loop, in place of gunicorn's
AsyncWorker.handle (whose steps and error handling it keeps, in order).

What rproxy's loop adds: a connection idle for PARK_AFTER seconds after a
response, with nothing buffered, leaves the loop and is parked
(parking.py); its next request resumes the loop in a new greenlet with a
new parser that carries on the connection's request count (so a PROXY
protocol header is read on the first request only) and PROXY info.
"""

from __future__ import annotations

import errno
import socket
import ssl
from typing import Any

from gunicorn import http, util
from gunicorn import sock as gunicorn_sock
from gunicorn.http.errors import InvalidH2CPreface
from gunicorn.http2 import negotiation

from rproxy.server import sockets
from rproxy.server.deadlines import Park
from rproxy.server.held import Held, HeldStream
from rproxy.server.parking import Parked
from rproxy.server.request_parser import RequestParser


def serve(worker: Any, listener: Any, client: socket.socket, addr: Any,
          parked: Parked | None = None) -> tuple[int, Any] | HeldStream | None:
    """Serve a new connection, or a parked one whose next request is coming.
    When the connection is to be parked: what its next greenlet needs (its
    request count and PROXY info); when its response is held (held.py): the
    held stream, with the same; in both cases the socket is left open.
    Otherwise None, and the socket is closed."""
    req = None
    cfg = worker.cfg
    ended: tuple[int, Any] | HeldStream | None = None
    try:
        if parked is None:
            if isinstance(client, ssl.SSLSocket) and not cfg.do_handshake_on_connect:
                client.do_handshake()
            if gunicorn_sock.is_http2_negotiated(client):
                worker.handle_http2(listener, client, addr)
                return None
            unread_preface = b""
            if negotiation.prior_knowledge_allowed(cfg, addr):
                matched, buf = negotiation.read_preface_blocking(client)
                if matched:
                    worker.handle_http2(listener, client, addr, preface=buf)
                    return None
                if negotiation.mismatch_is_error(cfg):
                    raise InvalidH2CPreface(buf)
                unread_preface = buf
            parser = http.get_parser(cfg, client, addr)
            if unread_preface:
                parser.unreader.unread(unread_preface)
            proxy_protocol_info: Any = {}
        else:
            parser = RequestParser(cfg, client, addr)
            parser.req_count = parked.req_count
            proxy_protocol_info = parked.proxy_protocol_info
        try:
            listener_name = sockets.listener_name(listener)
            if not cfg.keepalive:
                req = next(parser)
                if worker._try_h2c_upgrade(listener, req, parser, client, addr):
                    return None
                worker.handle_request(listener_name, req, client, addr)
            else:
                while True:
                    req = None
                    try:
                        parser.await_next()
                    except Park:
                        ended = (parser.req_count, proxy_protocol_info)
                        return ended
                    req = next(parser)
                    if worker._try_h2c_upgrade(listener, req, parser, client, addr):
                        return None
                    if req.proxy_protocol_info:
                        proxy_protocol_info = req.proxy_protocol_info
                    else:
                        req.proxy_protocol_info = proxy_protocol_info
                    worker.handle_request(listener_name, req, client, addr)
        except Held as held:
            stream = ended = held.stream
            stream.req_count, stream.proxy_protocol_info = parser.req_count, proxy_protocol_info
            stream.reusable = bool(cfg.keepalive) and parser.quiet_after()
            return ended
        except http.errors.NoMoreData as e:
            worker.log.debug("Ignored premature client disconnection. %s", e)
        except StopIteration as e:
            worker.log.debug("Closing connection. %s", e)
        except (ssl.SSLError, OSError):
            raise
        except Exception as e:
            worker.handle_error(req, client, addr, e)
    except ssl.SSLError as e:
        if e.args[0] == ssl.SSL_ERROR_EOF:
            worker.log.debug("ssl connection closed")
        else:
            worker.log.debug("Error processing SSL request.")
            worker.handle_error(req, client, addr, e)
    except OSError as e:
        if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
            worker.log.exception("Socket error processing request.")
        else:
            worker.log.debug("Ignoring %s", errno.errorcode.get(e.errno or 0, e))
    except BaseException as e:
        worker.handle_error(req, client, addr, e)
    finally:
        if ended is None:
            util.close(client)
    return ended
