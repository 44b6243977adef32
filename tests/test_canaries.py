"""Canaries: the other projects' internals rproxy relies on, each pinned
by name, signature and, where cheap, the behaviour relied on.

rproxy replaces module globals of gunicorn, overrides methods of gunicorn's,
gevent's and urllib3's classes that are not documented extension points,
and reads private attributes (docs/architecture.md has the table). An
upgrade that moves one of them would otherwise lose a guard or a pool
silently; here it fails one test, whose message names the rproxy module
that depends on it and what breaks. pyproject.toml pins the versions these
were checked against. In-process, no servers: the fast tier.
"""

from __future__ import annotations

import _socket
import inspect
import io
import logging
import queue
import re
import socket
import ssl

import gevent
import gevent.socket
import gevent.ssl
import gunicorn.http
import h2.connection
import hpack
import pytest
from gevent.baseserver import BaseServer
from gevent.pool import Pool
from gevent.server import StreamServer
from geventwebsocket.websocket import WebSocket
from gunicorn import glogging, util
from gunicorn.config import Config
from gunicorn.http import body, message, parser, unreader, wsgi
from gunicorn.http2 import connection as h2_connection
from gunicorn.http2 import request as h2_request
from gunicorn.http2 import response as http2_response
from gunicorn.http2.stream import HTTP2Stream, StreamState
from gunicorn.workers import base, base_async, ggevent
from hyperframe.frame import GoAwayFrame
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, connectionpool

from rproxy.messages import HEADER_CASE
from rproxy.observability import status_feed
from rproxy.server import (
    accesslog,
    header_case,
    http2,
    keepalive,
    parking,
    request_parser,
    response_writer,
    sockets,
    takeover,
    worker,
)
from rproxy.upstreams import servers


def params(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def source(obj) -> str:
    return inspect.getsource(obj)


# gunicorn's own response class, even where response_writer.install() replaced the global.
GUNICORN_RESPONSE = next(k for k in wsgi.Response.__mro__ if k.__module__ == wsgi.__name__)


def parsed(head: bytes, peer=("127.0.0.1", 1)) -> message.Request:
    """A request head parsed by gunicorn's own Request class."""
    return message.Request(Config(), unreader.IterUnreader(iter([head])), peer)


# --- Overridden methods -----------------------------------------------------
# Each rproxy subclass of a foreign class, the methods it overrides there, and
# why it matters. An override whose base method was renamed or re-signed is
# a guard that no longer runs, or a call that fails at run time.

OVERRIDES = [
    (worker.Worker, ggevent.GeventWorker,
     ["init_signals", "run", "handle", "handle_http2", "handle_http2_request",
      "handle_request", "handle_error", "is_already_handled"],
     "rproxy/server/worker.py: head deadlines, per-address caps, 408/429 answers, HTTP/2 side by side, takeovers, "
     "parked connections (keepalive.py's loop in place of AsyncWorker.handle's)"),
    (request_parser.RequestParser, parser.RequestParser, ["__init__", "__next__"],
     "rproxy/server/worker.py: an idle keep-alive connection's light wait for its next request"),
    (request_parser.Request, message.Request, ["_parse_fast", "parse_headers"],
     "rproxy/server/request_parser.py: 431 for a head with too many fields, whatever their count; the client's "
     "spelling of header names (preserve_header_case)"),
    (request_parser.ChunkedReader, body.ChunkedReader, ["__init__", "parse_chunk_size"],
     "rproxy/server/request_parser.py: a chunk size judged (413/400) before its data goes upstream"),
    (worker.Acceptor, StreamServer, ["do_handle", "close", "wrap_socket_and_handle"],
     "rproxy/server/worker.py: a connection greenlet started on the handler itself (memory per idle connection); "
     "parked connections closed when the listener stops"),
    (parking.ConnectionPool, Pool, ["__init__", "free_count", "_discard"],
     "rproxy/server/parking.py: a parked connection keeps its slot against worker_connections"),
    (response_writer.Response, GUNICORN_RESPONSE,
     ["__init__", "process_headers", "default_headers", "send_headers", "write", "_emit_body", "sendfile"],
     "rproxy/server/response_writer.py: head and first body piece in one send, rproxy's Server header, "
     "file-wrapped bodies (disk cache hits) by os.sendfile"),
    (response_writer.HTTP2Response, http2_response.HTTP2Response,
     ["process_headers", "send_headers", "_emit_body"],
     "rproxy/server/response_writer.py: rproxy's Server over HTTP/2, the application's Date or its own, "
     "the last DATA frame ending the stream"),
    (http2.ConcurrentConnection, h2_connection.HTTP2ServerConnection,
     ["__init__", "initiate_connection", "initiate_upgrade", "_handle_request_received",
      "send_response_headers", "send_data", "send_trailers", "send_error",
      "_process_events", "_handle_stream_reset", "_abort_all_streams", "pump",
      "_wait_for_flow_control_window", "cleanup_stream"],
     "rproxy/server/http2.py: HTTP/2 streams served side by side, frames handed to one writer, "
     "resets cut upstream waits"),
    (accesslog.AccessLogger, glogging.Logger, ["setup", "access"],
     "rproxy/server/accesslog.py: the proxy's access line, written once per loop turn"),
    (servers.ServerPool, HTTPConnectionPool, ["_get_conn", "_put_conn"],
     "rproxy/upstreams/servers.py: max_connections, the cheap idle-connection check"),
    (servers.TLSServerPool, HTTPSConnectionPool, ["_get_conn", "_put_conn"],
     "rproxy/upstreams/servers.py: the same for https:// upstreams"),
]

# Methods every class has (object's): overriding them is no reliance on a library.
_OBJECT_NAMES = set(dir(object))


def _rproxy_methods(cls, foreign) -> dict:
    """The functions (and properties) rproxy's classes between `cls` and
    `foreign` define, by name."""
    found = {}
    for klass in reversed(cls.__mro__[:cls.__mro__.index(foreign)]):
        if klass.__module__.startswith("rproxy"):
            for name, value in vars(klass).items():
                if inspect.isfunction(value) or isinstance(value, property):
                    found[name] = value
    return found


@pytest.mark.parametrize("cls, foreign, names, user", OVERRIDES, ids=[entry[0].__qualname__ for entry in OVERRIDES])
def test_each_overridden_method_still_exists_with_the_parameters_rproxy_takes(cls, foreign, names, user):
    mine = _rproxy_methods(cls, foreign)
    for name in names:
        where = f"{foreign.__module__}.{foreign.__qualname__}.{name}"
        assert name in mine, f"the canary lists {cls.__qualname__}.{name}, which rproxy no longer defines"
        theirs = getattr(foreign, name, None)
        assert theirs is not None, (
            f"{where} is gone: {user} overrides it, and the override no longer runs")
        ours = params(mine[name])
        expected = params(theirs)
        if inspect.Parameter.VAR_POSITIONAL not in {p.kind for p in inspect.signature(mine[name]).parameters.values()}:
            assert ours[:len(expected)] == expected, (
                f"{where}{inspect.signature(theirs)} no longer matches rproxy's {cls.__qualname__}.{name}"
                f"{inspect.signature(mine[name])}: {user} breaks")
    extra = sorted(name for name in mine
                   if name not in names and name not in _OBJECT_NAMES and hasattr(foreign, name))
    assert not extra, (f"{cls.__qualname__} overrides {extra} of {foreign.__qualname__}: add them to the "
                       "canary (OVERRIDES) with what rproxy relies on")


# --- gunicorn: names whose module globals the worker replaces ---------------


def test_gunicorn_builds_its_http1_parser_from_the_package_global(monkeypatch):
    # worker.py: gunicorn.http.RequestParser = RequestParser
    class Marker(parser.RequestParser):
        pass

    monkeypatch.setattr(gunicorn.http, "RequestParser", Marker)
    made = gunicorn.http.get_parser(Config(), iter([b""]), None)
    assert type(made) is Marker, (
        "gunicorn.http.get_parser no longer builds the global gunicorn.http.RequestParser: rproxy/server/worker.py's "
        "parser (the light keep-alive wait, its head deadline) is not used")
    assert "http.get_parser(self.cfg, client, addr)" in source(base_async.AsyncWorker.handle), (
        "gunicorn's AsyncWorker.handle no longer asks http.get_parser for its parser: rproxy/server/worker.py's "
        "RequestParser is not used")


def test_gunicorn_builds_chunked_body_readers_from_the_message_global(monkeypatch):
    # worker.py: message.ChunkedReader = ChunkedReader (413/400 on chunk sizes)
    class Marker(body.ChunkedReader):
        pass

    monkeypatch.setattr(message, "ChunkedReader", Marker)
    req = parsed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert type(req.body.reader) is Marker, (
        "gunicorn's Message.set_body_reader no longer builds message.ChunkedReader: rproxy/server/request_parser.py's chunk "
        "size limits (413 before the data goes upstream, 400 past 2**63) are not applied")
    assert params(body.ChunkedReader.parse_chunk_size) == ["self", "unreader", "data"], (
        "gunicorn's ChunkedReader.parse_chunk_size changed: rproxy/server/request_parser.py's ChunkedReader judges each size there")
    assert "_parse_fast" in source(message.Request.parse), (
        "gunicorn's Request.parse no longer calls _parse_fast: rproxy/server/request_parser.py's 431 for too many fields is lost")


def test_gunicorn_asks_the_module_global_whether_a_peer_may_forward(monkeypatch):
    # worker.py: message._ip_in_allow_list wrapped with a cache keyed by id(networks)
    assert params(message._ip_in_allow_list) == ["ip_str", "allow_list", "networks"], (
        "gunicorn's message._ip_in_allow_list changed: rproxy/server/worker.py's remembered trust calls it")
    calls = []
    real = message._ip_in_allow_list

    def recording(ip_str, allow_list, networks):
        calls.append((ip_str, allow_list, networks))
        return real(ip_str, allow_list, networks)

    monkeypatch.setattr(message, "_ip_in_allow_list", recording)
    config = Config()
    message.Request(config, unreader.IterUnreader(iter([b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-Proto: https"
                                                        b"\r\n\r\n"])), ("10.1.2.3", 1))
    assert calls and calls[0][0] == "10.1.2.3", (
        "gunicorn no longer asks message._ip_in_allow_list about the peer: rproxy/server/worker.py's cache of the "
        "answer is dead code (and a slower path is back)")
    # The cache is keyed by id(networks): the same list object for the life of the config.
    assert calls[0][2] is config.forwarded_allow_networks() is config.forwarded_allow_networks(), (
        "gunicorn's Config.forwarded_allow_networks() no longer returns one cached list: rproxy/server/worker.py's "
        "trust cache keyed by id(networks) could answer for the wrong list")


def test_gunicorns_parsers_hand_over_header_names_as_the_client_spelled_them(monkeypatch):
    # header_case.py: message._fast_parser_module wrapped; parse_headers given the head's bytes
    monkeypatch.setattr(message, "_fast_parser_module", message._fast_parser_module)  # restored after
    monkeypatch.setattr(header_case, "_recording", None)
    assert params(message._check_fast_parser) == ["cfg"] and message._check_fast_parser(Config()), (
        "gunicorn's message._check_fast_parser changed, or gunicorn_h1c is not used: "
        "rproxy/server/header_case.py cannot keep the client's spelling of header names")
    header_case.install(Config())
    assert "_fast_parser_module.parse_request(" in source(message.Request._parse_fast), (
        "gunicorn's Request._parse_fast no longer calls message._fast_parser_module.parse_request: "
        "rproxy/server/header_case.py's preserve_header_case sends stale or no spellings")
    req = parsed(b"GET / HTTP/1.1\r\nhost: x\r\nX-api-KEY: k\r\n\r\n")
    assert req.headers == [("HOST", "x"), ("X-API-KEY", "k")]
    assert header_case.fast_parsed() == {"Host": "host", "X-Api-Key": "X-api-KEY"}, (
        "gunicorn_h1c's parse_request no longer gives header names as sent in result['headers']: "
        "rproxy/server/header_case.py's preserve_header_case is wrong")
    assert "self.parse_headers(data[:idx], from_trailer=False)" in source(message.Request._parse_python), (
        "gunicorn's Python parser no longer hands the head's bytes to parse_headers: rproxy/server/request_parser.py's "
        "preserve_header_case misses them with http_parser = python")


def test_gunicorn_puts_a_request_fields_value_into_the_environ_as_it_is():
    # header_case.py: the spellings ride in req.headers as the field SPELLINGS (as http2.py's :PROTOCOL)
    req = parsed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    spelled = {"Host": "host"}
    req.headers.append((header_case.SPELLINGS, spelled))
    _, environ = wsgi.create(req, None, ("127.0.0.1", 1), ("127.0.0.1", 80), Config())
    assert environ.get(HEADER_CASE) is spelled, (
        "gunicorn's wsgi.create no longer puts a request field's value into the environ under HTTP_ + its name: "
        "rproxy/server/header_case.py's spellings never reach the forwarder (preserve_header_case)")


def test_the_gevent_worker_starts_its_servers_from_the_module_global():
    # worker.py: ggevent.StreamServer = Acceptor
    assert ggevent.GeventWorker.server_class is None and re.search(
        r"server = StreamServer\(s, handle=hfun", source(ggevent.GeventWorker.run)), (
        "gunicorn's GeventWorker.run no longer builds ggevent.StreamServer: rproxy/server/worker.py's Acceptor "
        "(one level of C stack less per connection) is not used")


def test_gevent_servers_spawn_through_the_attributes_rproxys_server_reads():
    # worker.py's Acceptor.do_handle reads _spawn, _handle and do_close as gevent's own does.
    assert params(BaseServer.do_handle) == ["self", "args"], (
        "gevent's BaseServer.do_handle changed: rproxy/server/worker.py's Acceptor overrides it")
    pool = Pool(2)

    def handle(sock, address):
        pass

    server = StreamServer(("127.0.0.1", 0), handle=handle, spawn=pool)
    assert server._spawn == pool.spawn and server._handle == handle, (
        "gevent's StreamServer no longer keeps _spawn and _handle: rproxy/server/worker.py's Acceptor.do_handle "
        "cannot start connections")
    assert StreamServer(("127.0.0.1", 0), handle=handle, spawn=None)._spawn is None
    assert params(StreamServer.do_close)[:2] == ["self", "sock"], (
        "gevent's StreamServer.do_close changed: rproxy/server/worker.py's Acceptor closes a connection it cannot start")
    assert "self.do_handle(*args)" in source(BaseServer._do_read), (
        "gevent's BaseServer._do_read no longer calls do_handle(*args): rproxy/server/worker.py's Acceptor is not used")
    # With TLS configured, connections start on wrap_socket_and_handle, which
    # worker.py's Acceptor overrides so that a parked connection stays open.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls = StreamServer(("127.0.0.1", 0), handle=handle, spawn=pool, ssl_context=context)
    tls.init_socket()  # as start() does
    tls.socket.close()
    assert tls._handle == tls.wrap_socket_and_handle and tls.ssl_args.get("server_side") is True, (
        "gevent's StreamServer no longer starts TLS connections on wrap_socket_and_handle with ssl_args: "
        "rproxy/server/worker.py's Acceptor override of it")
    assert params(StreamServer.wrap_socket_and_handle) == ["self", "client_socket", "address"]


def test_the_gevent_worker_builds_its_pools_from_the_module_global():
    # worker.py: ggevent.Pool = Worker._new_pool (parking.ConnectionPool)
    assert "pool = Pool(self.worker_connections)" in source(ggevent.GeventWorker.run), (
        "gunicorn's GeventWorker.run no longer builds ggevent.Pool(worker_connections): rproxy/server/parking.py's "
        "ConnectionPool is not used, and parked connections free their slot against worker_connections")
    assert "self.pool.full()" not in source(BaseServer._do_read) and "if self.full():" in source(BaseServer._do_read)
    assert "self.full = self.pool.full" in source(BaseServer.set_spawn), (
        "gevent's servers no longer ask the pool's full() before accepting: rproxy/server/parking.py's count of "
        "parked connections is not seen by the acceptor")


def test_gevent_pools_keep_the_slot_of_a_parked_connection_as_parking_py_does():
    # parking.ConnectionPool: Group.add rawlinks _discard, Pool._discard releases _semaphore,
    # which the server rawlinks to start accepting again; a greenlet's value is its handler's result.
    pool = parking.ConnectionPool(1)
    pool.serve_parked = lambda parked: None
    pool.spawn(lambda: parking.PARKED).join()
    gevent.sleep(0)  # the links run
    assert len(pool) == 0 and pool.full() and pool._semaphore.counter == 0, (
        "gevent's pool no longer discards a finished greenlet through _discard, or Pool.add no longer holds its "
        "_semaphore: rproxy/server/parking.py's parked slots are lost or counted twice")
    woken = []
    pool.resume(woken.append, "parked")
    gevent.sleep(0)
    gevent.sleep(0)
    assert woken == ["parked"] and len(pool) == 0 and pool._semaphore.counter == 1 and not pool.full(), (
        "a greenlet gevent's Group.add tracks no longer releases the pool's _semaphore when it ends: "
        "rproxy/server/parking.py's resume")
    pool.spawn(lambda: parking.PARKED).join()
    gevent.sleep(0)
    pool.unpark()
    assert pool._semaphore.counter == 1 and not pool.full()


def test_gevent_reports_accept_errors_through_the_hubs_handle_error_attribute():
    # worker.py: hub.handle_error replaced on the instance (out of descriptors: one log line a second)
    assert "self.loop.handle_error(self, *sys.exc_info())" in source(BaseServer._do_read), (
        "gevent's BaseServer no longer reports accept errors to loop.handle_error with itself as context: "
        "rproxy/server/worker.py's EMFILE log line is lost, gevent prints a traceback per failed accept")
    hub = gevent.get_hub()
    seen = []
    hub.handle_error = lambda *args: seen.append(args)
    try:
        # As gevent's servers do, from a greenlet, while the hub runs the loop.
        gevent.spawn(hub.loop.handle_error, "context", OSError, OSError(24, "EMFILE"), None).join()
    finally:
        del hub.handle_error
    assert seen and seen[0][0] == "context", (
        "gevent's loop no longer looks up handle_error on the hub instance: rproxy/server/worker.py's handler of "
        "EMFILE is never called")


def test_gevent_timers_take_what_the_worker_and_http2_give_them():
    # worker.py (head deadline) and http2.py (reset grace): loop.timer(..., priority=, ref=), start(..., update=)
    loop = gevent.get_hub().loop
    for timer in (loop.timer(60, priority=-1), loop.timer(60, ref=False)):
        timer.start(lambda *args: None, 1, 2, update=True)
        timer.close()


def test_settings_written_into_the_configs_dict_are_what_gunicorn_reads():
    # worker.py's settle_settings writes Config.__dict__
    config = Config()
    assert not hasattr(type(config), "__slots__") and "__getattr__" in vars(Config), (
        "gunicorn's Config changed shape: rproxy/server/worker.py's settle_settings (settings as plain attributes)")
    assert all(callable(getattr(setting, "get", None)) for setting in config.settings.values()), (
        "gunicorn's settings no longer have get(): rproxy/server/worker.py's settle_settings")
    worker.settle_settings(config)
    for name, setting in config.settings.items():
        if isinstance(inspect.getattr_static(Config, name, None), property):
            continue  # worker_class, ...: the property still runs, over the dict
        assert name in vars(config) and getattr(config, name) == setting.get(), (
            f"gunicorn's Config.{name} is not read from the instance dict: rproxy/server/worker.py's settle_settings")
    assert isinstance(inspect.getattr_static(config, "is_ssl"), property), (
        "gunicorn's Config.is_ssl is no longer a property: settle_settings may shadow it")


# --- gunicorn: the worker's loop, the hooks rproxy's worker assumes ---------


def test_gunicorns_connection_loop_calls_the_hooks_where_the_worker_expects():
    handle = source(base_async.AsyncWorker.handle)
    # rproxy/server/keepalive.py re-implements this method, step by step: the same steps, in order.
    steps = ["client.do_handshake()", "gunicorn_sock.is_http2_negotiated(client)", "self.handle_http2(listener, client, addr)",
             "negotiation.prior_knowledge_allowed(self.cfg, addr)", "negotiation.read_preface_blocking(client)",
             "negotiation.mismatch_is_error(self.cfg)", "http.get_parser(self.cfg, client, addr)",
             "parser.unreader.unread(unread_preface)", "if not self.cfg.keepalive:", "req = next(parser)",
             "self._try_h2c_upgrade(listener, req, parser, client", "req.proxy_protocol_info = proxy_protocol_info",
             "self.handle_request(listener_name, req, client, addr)", "except http.errors.NoMoreData",
             "util.close(client)"]
    at = 0
    for step in steps:
        at = handle.find(step, at)
        assert at >= 0, (
            f"gunicorn's AsyncWorker.handle changed (no {step!r} where it was): rproxy/server/keepalive.py's "
            "copy of it (the connection loop that parks idle connections) must follow")
    assert params(base_async.AsyncWorker._try_h2c_upgrade) == ["self", "listener", "req", "parser", "client", "addr"]
    assert keepalive.serve is not None
    assert "except StopIteration" in handle and "self.handle_error(req, client, addr, e)" in handle, (
        "gunicorn's AsyncWorker.handle no longer treats StopIteration as close and other errors via "
        "handle_error: rproxy/app.py's tunnel takeover and rproxy/server/worker.py's 408/429 answers break")
    handle_request = source(base_async.AsyncWorker.handle_request)
    assert "except StopIteration:\n            raise" in handle_request, (
        "gunicorn's handle_request no longer lets StopIteration through: a takeover (rproxy/server/takeover.py, "
        "ended by rproxy/server/worker.py's is_already_handled) would be logged as an error")
    assert re.search(r"respiter = self\.wsgi\(environ, resp\.start_response\)\s*"
                     r"if self\.is_already_handled\(respiter\):", handle_request), (
        "gunicorn no longer asks is_already_handled about the app's answer before writing it: a connection "
        "taken over by a tunnel (rproxy/server/takeover.py) would get a response written over it")
    assert "self.handle_http2(listener, client, addr" in handle, (
        "gunicorn no longer hands HTTP/2 connections to handle_http2: rproxy/server/http2.py is not used")
    assert params(base_async.AsyncWorker._serve_http2_stream) == [
        "self", "listener_name", "req", "sock", "addr", "h2_conn"], (
        "gunicorn's AsyncWorker._serve_http2_stream changed: rproxy/server/http2.py's serve_connection calls it per stream")
    assert params(base.Worker.handle_error) == ["self", "req", "client", "addr", "exc"]
    assert {"SIGTERM", "SIGQUIT", "SIGINT", "SIGHUP"} <= {getattr(s, "name", str(s)) for s in
                                                          ggevent.GeventWorker.SIGNALS}, (
        "gunicorn's Worker.SIGNALS changed: rproxy/server/worker.py holds those signals across the fork")


def test_the_keep_alive_wait_reads_the_parsers_buffer_and_socket():
    # request_parser.py's RequestParser.await_next: mesg, unreader.buf, unreader.sock, finish_body()
    a, b = socket.socketpair()
    with a, b:
        made = parser.RequestParser(Config(), a, ("127.0.0.1", 1))
        assert made.mesg is None and made.unreader.sock is a, (
            "gunicorn's parser no longer keeps mesg and unreader.sock: rproxy/server/request_parser.py's keep-alive wait")
        assert isinstance(made.unreader.buf, io.BytesIO), (
            "gunicorn's unreader no longer buffers in a BytesIO: rproxy/server/request_parser.py's keep-alive wait")
        assert made.finish_body() is True and params(parser.Parser.finish_body) == [
            "self", "deadline", "max_bytes"], (
            "gunicorn's Parser.finish_body changed: rproxy/server/request_parser.py's keep-alive wait")
    assert "self.finish_body()" in source(parser.Parser.__next__)


def test_buffered_bytes_behind_an_upgrade_head_are_found_where_the_tunnel_looks():
    # server/takeover.py, for tunnels and the status feed: body.reader.unreader.take_buffered() and body.buf
    req = parsed(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nFRAME")
    assert type(req.body.reader) is body.LengthReader and req.body.reader.length == 0, (
        "gunicorn no longer gives a request without a body a LengthReader of 0: rproxy/server/worker.py's "
        "_nothing_left and rproxy/forwarding/tunnel.py's takeover read it")
    assert not req.body.failed
    assert takeover.buffered_client_bytes({"wsgi.input": req.body}) == b"FRAME", (
        "the bytes a client sent behind its upgrade head are no longer in gunicorn's unreader buffer: "
        "rproxy/server/takeover.py would lose them for tunnels and the status feed")


# --- gunicorn: the response writers -----------------------------------------


def test_gunicorn_builds_responses_from_the_wsgi_global(monkeypatch):
    # response_writer.py: wsgi.Response = Response
    class Marker(wsgi.Response):
        pass

    monkeypatch.setattr(wsgi, "Response", Marker)
    a, b = socket.socketpair()
    with a, b:
        resp, environ = wsgi.create(parsed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), a, ("127.0.0.1", 1),
                                    ("127.0.0.1", 80), Config())
    assert type(resp) is Marker, (
        "gunicorn's wsgi.create no longer builds wsgi.Response: rproxy/server/response_writer.py's writer (one send "
        "per small response, rproxy's Server header) is not used")
    assert "response_class=HTTP2Response" in source(base_async.AsyncWorker.handle_http2_request), (
        "gunicorn's handle_http2_request no longer builds base_async.HTTP2Response: rproxy's Server header "
        "over HTTP/2 (rproxy/server/response_writer.py) is lost")


def test_gunicorns_response_write_sends_the_head_then_emits_the_body():
    write = source(GUNICORN_RESPONSE.write)
    assert write.index("self.send_headers()") < write.index("self._emit_body(arg)"), (
        "gunicorn's Response.write no longer calls send_headers() then _emit_body(): "
        "rproxy/server/response_writer.py's head held back for the first body piece breaks")
    a, b = socket.socketpair()
    with a, b:
        resp = GUNICORN_RESPONSE(parsed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), a, Config())
        for name in ("headers", "headers_sent", "response_length", "upgrade", "chunked", "sock", "req", "sent"):
            assert hasattr(resp, name), (
                f"gunicorn's Response has no {name}: rproxy/server/response_writer.py (and accesslog.py) read it")
    # rproxy's writer leaves each field's validation and the hop-by-hop ones to gunicorn's process_headers.
    resp = GUNICORN_RESPONSE(parsed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), None, Config())
    resp.process_headers([("Connection", "close"), ("Transfer-Encoding", "chunked"), ("X-A", " 1 ")])
    assert resp.headers == [("X-A", "1")], (
        "gunicorn's Response.process_headers no longer drops hop-by-hop fields or trims values: "
        "rproxy/server/response_writer.py relies on it")
    with pytest.raises(Exception):
        GUNICORN_RESPONSE(parsed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), None, Config()).process_headers(
            [("X-A", "1\r\nSet-Cookie: x=1")])
    # response_writer.py remembers the fields gunicorn kept unchanged and skips
    # its checks for them next time: sound only while its verdict on such a
    # field touches nothing but the header list, and the fields it reads into
    # the response are the ones the writer never remembers (_READ).
    for field in [("X-A", "1"), ("Content-Type", "text/plain"), ("Cache-Control", "no-store"), ("ETag", '"e"'),
                  ("Set-Cookie", "a=1"), ("Vary", "Accept"), ("Location", "/x"), ("Trailer", "X-T")]:
        resp = GUNICORN_RESPONSE(parsed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), None, Config())
        before = {k: v for k, v in vars(resp).items() if k != "headers"}
        resp.process_headers([field])
        assert {k: v for k, v in vars(resp).items() if k != "headers"} == before, (
            f"gunicorn's Response.process_headers now keeps state of a {field[0]} field: "
            "rproxy/server/response_writer.py's memo of checked fields would skip it")
    for name, value, attribute in [("Content-Length", "5", "response_length"), ("Connection", "upgrade", "upgrade")]:
        resp = GUNICORN_RESPONSE(parsed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), None, Config())
        resp.process_headers([(name, value)])
        assert getattr(resp, attribute) in (5, True), f"gunicorn's process_headers no longer reads {name}"
    assert {"content-length", "upgrade"} == response_writer._READ


def test_gunicorns_handle_request_lets_a_parking_stream_leave_through_access_close_and_post_request():
    # server/held.py: a held stream parks by raising HeldPark (a BaseException) out of the write loop.
    # gunicorn must let it through (catching Exception and SystemExit only), and on the way out call
    # log.access (skipped for it, taking the request time), respiter.close (a no-op for it) and
    # post_request (skipped, taking the Response the stream goes on with).
    handle = source(base_async.AsyncWorker.handle_request)
    assert "except (Exception, SystemExit):" in handle and "except BaseException" not in handle, (
        "gunicorn's handle_request now catches more than Exception and SystemExit: a held stream's park "
        "(rproxy/server/held.py) would be taken for an error")
    assert re.search(r"for item in respiter:\s*resp\.write\(item\)\s*resp\.close\(\)\s*finally:\s*"
                     r"request_time = datetime\.now\(\) - request_start\s*"
                     r"self\.log\.access\(resp, req, environ, request_time\)\s*"
                     r"if hasattr\(respiter, \"close\"\):\s*respiter\.close\(\)", handle), (
        "gunicorn's handle_request no longer ends its write loop with log.access then respiter.close: "
        "rproxy/server/held.py's park (and _finish, which does the same at a held stream's end) breaks")
    assert "self.cfg.post_request(self, req, environ, resp)" in handle, (
        "gunicorn's handle_request no longer calls post_request with its Response: rproxy/server/held.py "
        "takes the Response of a parking stream there")


def test_gunicorn_sends_a_file_wrapped_body_through_response_sendfile():
    # rproxy's Response.sendfile (disk cache hits by os.sendfile) runs only if
    # the worker hands a wsgi.file_wrapper body to write_file, which asks sendfile first.
    handle = source(base_async.AsyncWorker.handle_request)
    assert "isinstance(respiter, environ['wsgi.file_wrapper'])" in handle and "resp.write_file(respiter)" in handle, (
        "gunicorn's async worker no longer sends a wsgi.file_wrapper body with write_file: "
        "rproxy/server/response_writer.py's sendfile is never used (disk cache hits are read in chunks)")
    assert "if not self.sendfile(respiter):" in source(GUNICORN_RESPONSE.write_file), (
        "gunicorn's Response.write_file no longer tries sendfile first: rproxy/server/response_writer.py")
    assert "self._omits_body" in source(GUNICORN_RESPONSE.sendfile), (
        "gunicorn's Response.sendfile no longer reads _omits_body: rproxy/server/response_writer.py's sendfile "
        "reads it to send no body on HEAD, 1xx, 204 and 304")
    resp = GUNICORN_RESPONSE(parsed(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"), None, Config())
    resp.start_response("200 OK", [("Content-Length", "3")])
    assert resp._omits_body is True, (
        "gunicorn's Response._omits_body no longer says a HEAD response has no body: "
        "rproxy/server/response_writer.py's sendfile")


def test_gunicorns_http2_response_still_aborts_and_sends_headers_as_rproxy_does():
    assert params(http2_response.HTTP2Response._aborted) == ["self", "what"]
    assert params(h2_connection.HTTP2ServerConnection.send_response_headers) == [
        "self", "stream_id", "status", "headers", "end_stream"], (
        "gunicorn's send_response_headers changed: rproxy/server/response_writer.py's HTTP2Response calls it")
    assert "self.stream_id = stream_id" in source(http2_response.HTTP2Response.__init__)
    assert "self.h2_conn = h2_conn" in source(http2_response.HTTP2Response.__init__)
    # rproxy's HTTP/2 response adds the application's Date back itself: two if gunicorn kept it.
    assert "date" in util.hop_headers and "is_hoppish" in source(GUNICORN_RESPONSE.process_headers), (
        "gunicorn's Response.process_headers no longer drops Date: rproxy/server/response_writer.py's "
        "HTTP2Response would send it twice")
    # A DATA frame that completes the Content-Length ends the stream: write()
    # counts `sent` before _emit_body, and close() ends no stream twice.
    write = source(GUNICORN_RESPONSE.write)
    assert write.index("self.sent += tosend") < write.index("self._emit_body(arg)"), (
        "gunicorn's Response.write no longer counts sent before _emit_body(): rproxy/server/response_writer.py's "
        "HTTP2Response would end a stream early or never")
    close = source(http2_response.HTTP2Response.close)
    assert close.index("if self._stream_ended:") < close.index("end_stream("), (
        "gunicorn's HTTP2Response.close no longer skips an ended stream: rproxy/server/response_writer.py's "
        "HTTP2Response ends it with its last DATA frame")
    assert 'getattr(self, "trailers", None)' in close, (
        "gunicorn's HTTP2Response keeps trailers elsewhere: rproxy/server/response_writer.py reads self.trailers")


# --- gunicorn's HTTP/2 connection, as rproxy/server/http2.py drives it ----------------


def test_gunicorns_http2_connection_writes_only_through_send_pending_data():
    # http2_writer.py's FrameSocket takes what gunicorn's connection writes
    # with sock.sendall and hands it to the one writer greenlet: a write by
    # any other means would interleave frames.
    module = source(h2_connection)
    assert module.count("sock.sendall(") == 1 and "self.sock.sendall(data)" in source(
        h2_connection.HTTP2ServerConnection._send_pending_data), (
        "gunicorn's HTTP/2 connection writes to the socket outside _send_pending_data: rproxy/server/"
        "http2_writer.py's writer no longer keeps frames of concurrent streams apart")


# gunicorn's methods that queue frames in h2 without calling _send_pending_data
# themselves: each runs inside _read_and_process, which ends in _process_events
# (or in close() on a protocol error), and both send.
_QUEUED_FOR_PROCESS_EVENTS = {"_handle_data_received", "_handle_request_received", "_read_and_process",
                              "_reset_quietly"}
_QUEUES_FRAMES = re.compile(r"self\.h2_conn\.(?:send_headers|send_data|reset_stream|close_connection|end_stream|"
                            r"increment_flow_control_window|push_stream|ping|update_settings|acknowledge_settings|"
                            r"initiate_connection|initiate_upgrade_connection|receive_data)\(|self\._reset_quietly\(")


def test_every_path_of_gunicorns_http2_connection_that_queues_frames_ends_in_send_pending_data():
    # http2_writer.py's writer sends what _send_pending_data hands it: a frame queued
    # in h2 on a path that never calls it would wait for the next write on the
    # connection, however long that takes.
    assert "self._send_pending_data()" in source(h2_connection.HTTP2ServerConnection._process_events)
    silent = sorted(name for name, f in inspect.getmembers(h2_connection.HTTP2ServerConnection, inspect.isfunction)
                    if _QUEUES_FRAMES.search(source(f)) and "self._send_pending_data()" not in source(f))
    assert set(silent) <= _QUEUED_FOR_PROCESS_EVENTS, (
        f"gunicorn's HTTP/2 connection queues frames in {sorted(set(silent) - _QUEUED_FOR_PROCESS_EVENTS)} without "
        "_send_pending_data: rproxy/server/http2.py's writer would leave them waiting for a later write")


def test_gunicorn_resets_a_finished_stream_only_for_a_body_it_has_not_seen_end():
    # http2.py's cleanup_stream marks a body complete by its Content-Length so
    # that gunicorn sends no RST_STREAM(NO_ERROR) ahead of the client's END_STREAM.
    cleanup = source(h2_connection.HTTP2ServerConnection.cleanup_stream)
    assert "elif not stream.body_complete:" in cleanup and "HTTP2ErrorCode.NO_ERROR" in cleanup, (
        "gunicorn's cleanup_stream no longer decides its NO_ERROR reset on body_complete: rproxy/server/http2.py's "
        "cleanup_stream no longer spares a stream whose END_STREAM is still to come")
    assert "return self._body_complete" in source(HTTP2Stream.body_complete.fget), (
        "gunicorn's HTTP2Stream.body_complete no longer reads _body_complete: rproxy/server/http2.py's cleanup_stream")


def test_gunicorns_http2_connection_calls_the_methods_rproxy_overrides():
    conn = h2_connection.HTTP2ServerConnection
    assert "self._wait_for_flow_control_window(stream_id, deadline)" in source(conn.send_data), (
        "gunicorn's send_data no longer waits through _wait_for_flow_control_window: rproxy/server/http2.py's "
        "stream greenlets would read the socket themselves")
    assert "pump(stream.stream_id)" in source(h2_request), (
        "gunicorn's HTTP/2 request body no longer pulls frames through connection.pump: rproxy/server/http2.py's "
        "reader greenlet and body waits break")
    handle_event = source(conn._handle_event)
    assert "self._handle_request_received(event)" in handle_event, (
        "gunicorn no longer routes HEADERS through _handle_request_received: rproxy/server/http2.py's 431/414 "
        "answers over HTTP/2 are lost")
    assert "self._handle_stream_reset(event)" in handle_event, (
        "gunicorn no longer routes RST_STREAM through _handle_stream_reset: rproxy/server/http2.py no longer "
        "cuts a reset stream's upstream wait")
    assert "return self._process_events(events)" in source(conn._read_and_process), (
        "gunicorn no longer processes frames through _process_events: rproxy/server/http2.py's waiting streams "
        "are never woken")
    assert "self._abort_all_streams()" in source(conn._read_and_process), (
        "gunicorn no longer aborts all streams when the client goes: rproxy/server/http2.py's upstream waits linger")
    assert "MAX_CONCURRENT_STREAMS: self.max_concurrent_streams" in source(conn.initiate_connection), (
        "gunicorn's initiate_connection changed: rproxy/server/http2.py's _settle_stream_limit assumes it announces "
        "max_concurrent_streams")


def test_gunicorns_http2_connection_keeps_the_state_rproxy_reads():
    a, b = socket.socketpair()
    with a, b:
        conn = h2_connection.HTTP2ServerConnection(Config(), a, ("127.0.0.1", 1))
        for name in ("_closed", "streams", "draining", "peer_last_stream_id", "h2_conn", "sock", "cfg",
                     "client_addr", "stream_timeout", "max_concurrent_streams"):
            assert hasattr(conn, name), (
                f"gunicorn's HTTP2ServerConnection has no {name}: rproxy/server/http2.py reads it")
        assert conn.is_closed is conn._closed is False
        assert isinstance(conn.h2_conn.decoder, hpack.Decoder), (
            "h2's connection no longer decodes with an hpack.Decoder in .decoder: rproxy/server/http2.py's "
            "431 for an oversized header list replaces it")
        stream = HTTP2Stream(1, conn)
        for name in ("state", "stream_id", "body_complete", "unacked_size", "body_size", "disconnected",
                     "request_headers", "response_complete", "_body_complete"):
            assert hasattr(stream, name), f"gunicorn's HTTP2Stream has no {name}: rproxy/server/http2.py reads it"
        assert StreamState.CLOSED
        assert callable(stream.get_pseudo_headers)
    connection = h2_connection.HTTP2ServerConnection
    assert params(connection.close) == ["self", "error_code", "last_stream_id"]
    assert params(connection.abort_stream) == ["self", "stream_id", "error_code"]
    assert params(connection.cleanup_stream) == ["self", "stream_id"]
    assert params(connection.receive_data) == ["self", "data"]


def test_h2_and_hpack_honour_the_header_list_limit_as_http2_py_bends_it():
    # http2.py's _Decoder reads and sets max_header_list_size, which h2 sets on a settings ack.
    assert "max_header_list_size" in params(hpack.Decoder.__init__)
    assert "self.max_header_list_size" in source(hpack.Decoder.decode), (
        "hpack's Decoder no longer checks self.max_header_list_size while decoding: rproxy/server/http2.py's "
        "bound on what one header block inflates to is gone")
    assert "self.decoder.max_header_list_size = setting.new_value" in source(h2.connection.H2Connection), (
        "h2 no longer sets decoder.max_header_list_size from the acknowledged settings: rproxy/server/http2.py's "
        "_Decoder no longer learns the announced limit")
    frame = GoAwayFrame(0)
    frame.last_stream_id, frame.error_code = 3, 0
    assert frame.serialize()[3] == 0x07, "hyperframe's GoAwayFrame changed: rproxy/server/http2.py's graceful GOAWAY"


# --- urllib3: the pool overrides --------------------------------------------


def test_urllib3_keeps_idle_connections_in_a_lifo_queue_of_slots():
    # servers.py's _get_conn takes from urllib3's own queue with get(block=False):
    # None for a slot with no connection yet, queue.Empty when every slot is taken.
    pool = servers.ServerPool("127.0.0.1", 9, maxsize=3, retries=False)
    try:
        assert isinstance(pool.pool, queue.LifoQueue) and pool.pool.qsize() == 3, (
            "urllib3's pool no longer keeps a LifoQueue of maxsize slots: rproxy/upstreams/servers.py's _get_conn")
        conns = [pool._get_conn() for _ in range(3)]  # new connections, not yet connected
        assert all(conn.sock is None for conn in conns), (
            "urllib3 connects on _new_conn: rproxy/forwarding/forwarder.py expects a lazy connection")
        with pytest.raises(queue.Empty):
            pool.pool.get(block=False)
        for conn in conns:
            pool._put_conn(conn)
        assert pool._get_conn() is conns[-1], "urllib3's queue is no longer last in, first out"
    finally:
        pool.close()
    assert pool.pool is None, (
        "urllib3's close() no longer sets pool to None: rproxy/upstreams/servers.py's _get_conn detects a closed pool so")


def test_urllib3s_pool_methods_keep_the_parameters_rproxy_calls():
    pool = connectionpool.HTTPConnectionPool
    assert params(pool._get_conn) == ["self", "timeout"], (
        "urllib3's _get_conn changed: rproxy/forwarding/forwarder.py calls it with timeout=")
    assert params(pool._put_conn) == ["self", "conn"], "urllib3's _put_conn changed: rproxy/forwarding/forwarder.py calls it"
    assert params(pool._new_conn) == ["self"], "urllib3's _new_conn changed: rproxy/forwarding/tunnel.py opens tunnels with it"


def test_gevent_sockets_keep_the_real_socket_in_sock():
    # server/sockets.py's readable_now peeks at sock._sock, non-blocking, without a greenlet switch.
    a, b = gevent.socket.socketpair()
    with a, b:
        raw = getattr(a, "_sock", None)
        assert isinstance(raw, _socket.socket) and raw.gettimeout() == 0.0, (
            "gevent's socket no longer keeps the real, non-blocking socket in _sock: rproxy/server/sockets.py's idle "
            "connection check (upstream pools) falls back to urllib3's poll (a greenlet switch per request)")
        with pytest.raises(BlockingIOError):
            raw.recv(1, socket.MSG_PEEK)
        b.sendall(b"x")
        gevent.socket.wait_read(a.fileno(), 5)
        assert raw.recv(1, socket.MSG_PEEK) == b"x"
        assert sockets.readable_now(a) is True
    # server/sockets.py's shutdown_tcp half-closes a TLS connection's TCP socket with gevent.socket.socket.shutdown.
    assert issubclass(gevent.ssl.SSLSocket, gevent.socket.socket), (
        "gevent's SSLSocket is no longer a gevent socket: rproxy/server/sockets.py's half-close of TLS tunnels breaks")


# --- the rest: gevent-websocket, gunicorn's logger, the stdlib ------------------


def test_gevent_websocket_frames_over_the_stream_status_feed_gives_it():
    # status_feed.py builds WebSocket(environ, stream, handler) by hand and reads frames itself.
    assert params(WebSocket.__init__) == ["self", "environ", "stream", "handler"]
    assert params(WebSocket.read_frame) == ["self"]
    assert params(WebSocket.handle_close) == params(WebSocket.handle_ping) == ["self", "header", "payload"]
    assert WebSocket.OPCODE_CLOSE == 8 and WebSocket.OPCODE_PING == 9
    a, b = socket.socketpair()
    with a, b:
        ws = WebSocket({}, status_feed._Stream(a, b""), status_feed._HANDLER)
        ws.send("hi")
        assert b.recv(16) == b"\x81\x02hi", "gevent-websocket's send changed: rproxy/observability/status_feed.py"
        b.sendall(b"\x89\x80abcd")  # a masked, empty ping
        header, payload = ws.read_frame()
        assert header.opcode == WebSocket.OPCODE_PING and payload == b""
        ws.closed = True  # status_feed.py does so, so that __del__ sends nothing
    assert "if self.closed" in source(WebSocket.close), "gevent-websocket's close() no longer honours closed"


def test_gunicorns_logger_keeps_what_the_access_logger_reads():
    init = source(glogging.Logger.__init__)
    assert 'self.access_log = logging.getLogger("gunicorn.access")' in init and "self.error_log" in init, (
        "gunicorn's Logger no longer keeps access_log / error_log: rproxy/server/accesslog.py writes through them")
    assert isinstance(inspect.getattr_static(glogging.Logger, "access_log_enabled"), property)
    assert params(glogging.Logger.access) == ["self", "resp", "req", "environ", "request_time"]
    assert logging.Formatter("%(message)s")._fmt == "%(message)s", (
        "logging.Formatter._fmt is gone: rproxy/server/accesslog.py recognises gunicorn's plain access log by it")
