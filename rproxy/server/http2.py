"""HTTP/2 connections served with their streams side by side.

gunicorn's gevent worker serves the streams of one HTTP/2 connection one
after another, so one slow upstream response holds back every other request
on that connection. Here the connection's greenlet only reads frames; each
stream is served by a greenlet of its own (at most
http2_max_concurrent_streams per connection). A stream that waits for its
request body or for send window waits for the reader to bring the frames,
rather than reading the socket itself.

One greenlet writes to the connection (http2_writer.py): the frames of all
the streams that ran in a turn of the worker's loop go out in one send.

A head over the request limits (too many fields, a field or header list too
large, a target too long) is answered on its stream as over HTTP/1.1 (431,
414), where gunicorn would reset the stream.

What one client connection can hold is bounded: each stream in flight holds
at most one upstream connection and one 64 KiB piece of its response, so
http2_max_concurrent_streams bounds both; a stream whose client takes none
of its response (a window kept at 0) for client_timeout is reset and its
upstream connection closed, as is a connection whose client reads nothing
for that long. A stream the client resets, or whose connection ends, stops
waiting on its upstream within RESET_GRACE (client_left.py), so reset
streams free their upstream connections about as fast as the client resets
them.
"""

from __future__ import annotations

import errno
import logging
import ssl
import time
from typing import Any

from gevent import Greenlet, get_hub, getcurrent
from gevent.event import Event
from gevent.pool import Pool
from gunicorn.http2.connection import HTTP2ServerConnection
from gunicorn.http2.errors import HTTP2ConnectionError, HTTP2ErrorCode, HTTP2ProtocolError
from gunicorn.http2.stream import HTTP2Stream, StreamState
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hpack import Decoder
from hyperframe.frame import GoAwayFrame

from rproxy.server import sockets
from rproxy.server.client_left import ClientLeft, waiting
from rproxy.server.http2_requests import over_limits
from rproxy.server.http2_writer import FrameSocket

log = logging.getLogger("rproxy.http2")

# A header list past the size announced to the client (SETTINGS_MAX_HEADER_
# LIST_SIZE) is still decoded, up to this many times it, so that its stream
# can be answered 431 like any other head over the limits. Past that the
# decoding stops, and the connection with it (its HPACK state is lost): the
# bound on what one header block may inflate to.
HEADER_LIST_SLACK = 4

# A stream reset while its upstream request is under way is cut this long
# after, if still waiting: most upstream answers come within it, and one that
# does leaves its connection reusable in the pool (cut, it is closed, and the
# next request pays for a new one). Meanwhile the stream still counts against
# http2_max_concurrent_streams, which slows a rapid reset flood down.
RESET_GRACE = 0.25

class _Decoder(Decoder):
    """hpack's decoder, taking header lists up to HEADER_LIST_SLACK times
    the limit h2 gives it (h2 sets it again when the client acknowledges
    the settings)."""

    @property
    def max_header_list_size(self) -> int:
        return self._announced * HEADER_LIST_SLACK

    @max_header_list_size.setter
    def max_header_list_size(self, value: int) -> None:
        self._announced = value


class ConcurrentConnection(HTTP2ServerConnection):
    """gunicorn's HTTP/2 connection, shared by one reader and many writers."""

    def __init__(self, cfg: Any, sock: Any, client_addr: Any, client_timeout: float) -> None:
        # A write that makes no progress for client_timeout gives up (the
        # client reads nothing), as a stream whose request body or send
        # window makes no progress does: as over HTTP/1.1.
        frames = FrameSocket(sock, client_timeout)
        super().__init__(cfg, frames, client_addr)
        frames.pending, frames.failed = self.h2_conn.data_to_send, self._write_failed
        self.stream_timeout = client_timeout
        # Nothing decoded yet: a fresh decoder loses no HPACK state.
        self.h2_conn.decoder = _Decoder(self.h2_conn.decoder.max_header_list_size)
        self._progress = Event()
        self._loop = get_hub().loop
        self.serving: dict[int, Greenlet] = {}  # stream id -> the greenlet serving it

    # A stream's greenlet whose client left is cut short (see client_left.py),
    # from the hub, RESET_GRACE later if it still waits on its upstream. It
    # never writes to the socket itself (the writer does), so no frame is cut
    # in two by it.

    def cut(self, stream_id: int) -> None:
        greenlet = self.serving.get(stream_id)
        if greenlet is not None:
            timer = self._loop.timer(RESET_GRACE, ref=False)
            timer.start(self._deliver_cut, stream_id, greenlet, timer)

    def _deliver_cut(self, stream_id: int, greenlet: Greenlet, timer: Any) -> None:
        timer.close()
        if self.serving.get(stream_id) is greenlet:  # else done meanwhile
            waiting.cut_short(greenlet)

    def initiate_connection(self) -> None:
        self._settle_stream_limit()
        super().initiate_connection()

    def initiate_upgrade(self, settings_header: str, http1_req: Any, body: bytes | None = None) -> Any:
        self._settle_stream_limit()
        return super().initiate_upgrade(settings_header, http1_req, body)

    def _settle_stream_limit(self) -> None:
        # gunicorn queues its settings with update_settings(), then h2's
        # preamble sends a second SETTINGS frame with h2's current values:
        # clients are told 100 streams whatever is configured, while the
        # configured limit is enforced once they ack the first frame, and a
        # client that opens more loses the whole connection. Make the limit
        # current before either frame is written, so both say the same.
        current = dict(self.h2_conn.local_settings.items())
        current[SettingCodes.MAX_CONCURRENT_STREAMS] = self.max_concurrent_streams
        self.h2_conn.local_settings = Settings(client=False, initial_values=current)

    def announce_goaway(self, last_stream_id: int) -> None:
        """Graceful shutdown: tell the client, with GOAWAY, that streams after
        `last_stream_id` will not be served (it retries them on a new
        connection), while those up to it finish. Written past h2, whose own
        GOAWAY would close the state machine to the streams still running."""
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = HTTP2ErrorCode.NO_ERROR
        self.sock.sendall(self.h2_conn.data_to_send() + frame.serialize())

    def _handle_request_received(self, event: Any) -> Any:
        # gunicorn resets a stream whose head is over the request limits
        # (PROTOCOL_ERROR); its client gets the answer an HTTP/1.1 one gets.
        refused = over_limits(self.cfg, event.headers)
        if refused is None or (self.draining and event.stream_id > self.peer_last_stream_id):
            return super()._handle_request_received(event)
        status, message = refused
        stream_id = event.stream_id
        stream = HTTP2Stream(stream_id, self)
        self.streams[stream_id] = stream
        stream.receive_headers(event.headers, end_stream=event.stream_ended is not None)
        log.warning("Invalid request from ip=%s over HTTP/2: %s: %d",
                    self.client_addr[0] if isinstance(self.client_addr, tuple) else "-", message, status)
        self.send_error(stream_id, status, message + "\n")
        if event.stream_ended is None:
            # A body may follow: not wanted (RFC 9113 8.1, a complete response first).
            self.abort_stream(stream_id, HTTP2ErrorCode.NO_ERROR)
        return None

    def _wake(self) -> None:
        """Frames were processed (or the connection ended): waiters look again."""
        progress, self._progress = self._progress, Event()
        progress.set()

    def _write_failed(self) -> None:
        self._closed = True
        self._abort_all_streams()

    # Writes on a connection that is closed already (a GOAWAY for a flood,
    # the client gone) end the stream quietly, as on a reset stream, rather
    # than with h2's error for a closed state machine.

    def send_response_headers(self, stream_id: int, status: int, headers: list[tuple[str, str]],
                              end_stream: bool = False) -> bool:
        return not self._closed and bool(super().send_response_headers(stream_id, status, headers, end_stream))

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> bool:
        return not self._closed and bool(super().send_data(stream_id, data, end_stream))

    def send_trailers(self, stream_id: int, trailers: list[tuple[str, str]]) -> bool:
        return not self._closed and bool(super().send_trailers(stream_id, trailers))

    def send_error(self, stream_id: int, status_code: int, message: str | None = None) -> None:
        if not self._closed:
            super().send_error(stream_id, status_code, message)

    def cleanup_stream(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if (stream is not None and stream.response_complete and not stream.body_complete
                and stream.state is not StreamState.CLOSED and _whole_body_in(stream)):
            # The body is all here by its Content-Length, only the END_STREAM
            # flag is to come (httpx sends it in a frame of its own). gunicorn
            # would ask the client to stop sending, with RST_STREAM(NO_ERROR)
            # (RFC 9113 8.1), which races that frame: a client that then sends
            # it on the reset stream fails a request it had its answer to
            # (httpx does). h2 closes the stream when the flag comes; no data
            # can come with it (h2 holds a body to its Content-Length).
            stream._body_complete = True
        super().cleanup_stream(stream_id)

    def _process_events(self, events: list[Any]) -> Any:
        try:
            return super()._process_events(events)
        finally:
            self._wake()

    def _handle_stream_reset(self, event: Any) -> None:
        try:
            super()._handle_stream_reset(event)
        finally:
            self.cut(event.stream_id)

    def _abort_all_streams(self) -> None:
        super()._abort_all_streams()
        for stream_id in self.serving:
            self.cut(stream_id)
        self._wake()

    def pump(self, stream_id: int | None = None) -> None:
        """A stream's body reader needs more: wait until the reader brought
        some, the body ended or the stream died; a body stalled longer than
        gunicorn's timeout is cancelled, as gunicorn does."""
        stream = self.streams.get(stream_id)
        deadline = time.monotonic() + self.stream_timeout if self.stream_timeout else None
        while (stream is not None and not self._closed and stream.state is not StreamState.CLOSED
               and not stream.unacked_size and not stream.body_complete):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self.abort_stream(stream_id, HTTP2ErrorCode.CANCEL)
                return
            self._progress.wait(remaining)

    def _wait_for_flow_control_window(self, stream_id: int, deadline: float | None = None) -> int:
        """As gunicorn's, but waiting for the reader's WINDOW_UPDATEs."""
        while True:
            stream = self.streams.get(stream_id)
            if self._closed or stream is None or stream.state is StreamState.CLOSED:
                return -1
            try:
                available: int = self.h2_conn.local_flow_control_window(stream_id)
            except ProtocolError:
                return -1
            if available > 0:
                return available
            remaining = None
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pseudo = stream.get_pseudo_headers()
                    log.info("client %s took no bytes of the response of %s %s for %gs "
                             "(its HTTP/2 window stayed closed): stream reset, upstream connection closed",
                             self.client_addr[0] if isinstance(self.client_addr, tuple) else "-",
                             pseudo.get(":method"), pseudo.get(":path"), self.stream_timeout)
                    return 0
            self._progress.wait(remaining)


def _whole_body_in(stream: HTTP2Stream) -> bool:
    """Whether the request's body has arrived to its Content-Length."""
    for name, value in stream.request_headers:
        if name == "content-length":
            return bool(value.isdigit() and stream.body_size >= int(value))
    return False


def serve_connection(worker: Any, listener: Any, client: Any, addr: Any, preface: bytes = b"",
                     upgrade: tuple[Any, Any, Any] | None = None) -> None:
    """gunicorn's handle_http2, for `worker`: read frames here, serve each stream in a greenlet."""
    listener_name = sockets.listener_name(listener)
    conn = ConcurrentConnection(worker.cfg, client, addr, worker.client_timeout)
    streams = Pool(worker.cfg.http2_max_concurrent_streams)
    last = 0

    def serve(req: Any) -> None:
        stream_id, me = req.stream.stream_id, getcurrent()
        if conn.is_closed or req.stream.disconnected:
            # Reset, or its connection lost, before its turn came: nothing
            # goes upstream for it.
            conn.cleanup_stream(stream_id)
            return
        conn.serving[stream_id] = me
        try:
            worker._serve_http2_stream(listener_name, req, client, addr, conn)
        except ClientLeft:
            worker.log.debug("HTTP/2 stream %d: the client reset it or left; stopped", stream_id)
        finally:
            del conn.serving[stream_id]
            waiting.forget(me)

    try:
        if upgrade is not None:  # h2c via Upgrade: the request is stream 1
            settings, http1_req, body = upgrade
            streams.spawn(serve, conn.initiate_upgrade(settings, http1_req, body))
            last = 1
        else:
            conn.initiate_connection()
        for req in conn.receive_data(preface) if preface else ():
            # Bytes read during h2c negotiation may hold requests already.
            last = max(last, req.stream.stream_id)
            streams.spawn(serve, req)
        stopping = False
        while not conn.is_closed and (worker.alive or conn.streams):
            for req in conn.receive_data():
                if worker.alive:
                    last = max(last, req.stream.stream_id)
                    streams.spawn(serve, req)
                    continue
                if not stopping:
                    conn.announce_goaway(last)
                    stopping = True
                # Beyond the GOAWAY: never served, the client sends it again elsewhere.
                conn.streams.pop(req.stream.stream_id, None)
            if not worker.alive and not stopping:
                conn.announce_goaway(last)
                stopping = True
    except (HTTP2ConnectionError, HTTP2ProtocolError) as e:
        worker.log.debug("HTTP/2 connection closed: %s", e)
    except ssl.SSLError as e:
        worker.log.debug("HTTP/2 TLS connection ended: %s", e)
    except OSError as e:
        if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
            worker.log.exception("HTTP/2 socket error")
    except Exception as e:
        worker.log.exception("HTTP/2 connection error: %s", e)
    finally:
        # GOAWAY names the last stream served; streams still running see
        # the connection closed at their next read or write and end.
        conn.close(last_stream_id=last)
        streams.join()
        conn.sock.drain()  # the closing GOAWAY and whatever the streams left
