"""gunicorn's logger, with the proxy's facts in every access line.

One line per request, in the combined format followed by the total time, the
upstream server and its time to the response head, the route and the request
id. A tunnel writes its line through the same logger. Setting gunicorn's own
`access_log_format` switches back to gunicorn's formatting, where the same
facts, from the request's record, are the environ atoms %({rproxy.upstream}e)s, %({rproxy.upstream_ms}e)s,
%({rproxy.route}e)s and %({rproxy.request_id}e)s.

The proxy's own loggers (`rproxy.*`) write to gunicorn's error log.
"""

from __future__ import annotations

import json
import logging
import select
import time
from datetime import timedelta
from typing import Any

import gevent
from gevent import monkey
from gunicorn import glogging
from gunicorn.config import AccessLogFormat, Config

from rproxy.observability import metrics
from rproxy.record import KEY as RECORD
from rproxy.record import NOTHING, RequestRecord
from rproxy.server.held import HELD

_DEFAULT_FORMAT = AccessLogFormat.default


def _quote(value: object) -> str:
    if not value:
        return "-"
    text = str(value)
    if '"' in text or "\\" in text or not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii").replace('"', '\\"')
    return text


_clock = (0, "", "")  # the second, and its two renderings: computed once a second


def _now() -> tuple[str, str]:
    """(common log format time, ISO 8601 time) for this second."""
    global _clock
    second = int(time.time())
    if second != _clock[0]:
        local = time.localtime(second)
        _clock = (second, time.strftime("[%d/%b/%Y:%H:%M:%S %z]", local),
                  time.strftime("%Y-%m-%dT%H:%M:%S%z", local))
    return _clock[1], _clock[2]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def line(environ: dict[str, Any], status: str | int, sent: int | None, total_ms: float) -> str:
    """One access-log line, combined format plus the proxy's facts."""
    record: RequestRecord = environ.get(RECORD) or NOTHING
    text = (
        f'{record.client or environ.get("REMOTE_ADDR", "-")} - - '
        f'{_now()[0]} '
        f'"{_quote(environ.get("REQUEST_METHOD"))} {_quote(environ.get("RAW_URI"))} '
        f'{_quote(environ.get("SERVER_PROTOCOL"))}" {status} {sent if sent is not None else "-"} '
        f'"{_quote(environ.get("HTTP_REFERER"))}" "{_quote(environ.get("HTTP_USER_AGENT"))}" '
        f'{total_ms:.1f}ms upstream={record.server or "-"} '
        f'upstream_ms={_ms(record.upstream_ms)} '
        f'route={record.route or "-"} rid={record.request_id or "-"}'
    )
    if record.error:
        text += f' error="{_quote(record.error)}"'
    return text


# What a line is made of: the request's record and the environ keys it reads,
# all that a tunnel keeps of its request.
FACTS = (RECORD, "REMOTE_ADDR", "REQUEST_METHOD", "RAW_URI", "SERVER_PROTOCOL", "HTTP_REFERER",
         "HTTP_USER_AGENT")


def json_line(environ: dict[str, Any], status: str | int, sent: int | None, total_ms: float,
              **extra: int) -> str:
    """The same facts as one JSON object."""
    record: RequestRecord = environ.get(RECORD) or NOTHING
    entry = {
        "time": _now()[1],
        "request_id": record.request_id,
        "client": record.client or environ.get("REMOTE_ADDR"),
        "method": environ.get("REQUEST_METHOD"),
        "path": environ.get("RAW_URI"),
        "protocol": environ.get("SERVER_PROTOCOL"),
        "status": int(status) if str(status).isdigit() else status,
        "bytes": sent,
        "total_ms": round(total_ms, 1),
        "upstream": record.server,
        "upstream_ms": None if record.upstream_ms is None else round(record.upstream_ms, 1),
        "route": record.route,
        "cache": record.cache,
        "user_agent": environ.get("HTTP_USER_AGENT"),
    }
    if record.error:
        entry["error"] = record.error
    entry.update(extra)
    return json.dumps(entry, separators=(",", ":"))


def environ_atoms(environ: dict[str, Any]) -> dict[str, Any]:
    """`environ` with the record's facts as the `rproxy.*` keys that
    gunicorn's own access_log_format names as %({rproxy.upstream}e)s etc."""
    record: RequestRecord | None = environ.get(RECORD)
    if record is None:
        return environ
    facts = {"rproxy.client": record.client, "rproxy.request_id": record.request_id,
             "rproxy.route": record.route, "rproxy.upstream": record.server,
             "rproxy.upstream_name": record.upstream,
             "rproxy.upstream_ms": None if record.upstream_ms is None else f"{record.upstream_ms:.1f}",
             "rproxy.cache": record.cache,
             "rproxy.cache_ms": None if record.cache_ms is None else f"{record.cache_ms:.2f}",
             "rproxy.error": record.error}
    # An absent fact stays absent: gunicorn writes "-" for it.
    return {**environ, **{key: value for key, value in facts.items() if value is not None}}


def tunnel_line(facts: dict[str, Any], seconds: float, upstream_bytes: int, client_bytes: int) -> None:
    """The access line of a finished tunnel: status 101, bytes each way."""
    metrics.observe_request(facts, 101, seconds)
    if _lines_in_json[0]:
        text = json_line(facts, 101, client_bytes, seconds * 1000, tunnel_up=upstream_bytes,
                         tunnel_down=client_bytes)
    else:
        text = (f"{line(facts, 101, client_bytes, seconds * 1000)} "
                f"tunnel_up={upstream_bytes} tunnel_down={client_bytes}")
    logging.getLogger("gunicorn.access").info(text)


# Whether this process's access lines are JSON: set with the logger, read by
# tunnel lines, which are written from outside it.
_lines_in_json = [False]


class AccessLogger(glogging.Logger):
    """Lines in the combined format, plus the proxy's facts."""

    json_lines = False

    def setup(self, cfg: Config) -> None:
        super().setup(cfg)
        # At a reload gunicorn sets this same logger up again with the new
        # settings: the class they name says the format now.
        self.json_lines = _lines_in_json[0] = getattr(cfg.logger_class, "json_lines", False)
        proxy_log = logging.getLogger("rproxy")
        proxy_log.handlers = list(self.error_log.handlers)
        proxy_log.setLevel(self.error_log.level)
        proxy_log.propagate = False
        self._streams = _plain_streams(self.access_log)
        self._pending: list[str] = []
        self._record_atoms = "{rproxy." in cfg.access_log_format.lower()

    def _write(self, text: str) -> None:
        if self._streams is None:
            self.access_log.info(text)
            return
        # Straight to the file: a log record, a formatter and a lock per
        # line cost more than the line. And written once per turn of the
        # event loop, for all the requests that ended in it, rather than a
        # system call per line: under load that was 3% of the throughput.
        pending = self._pending
        pending.append(text)
        if len(pending) == 1:
            loop = _event_loop()
            if loop is None:
                self.flush_access()
            else:
                loop.run_callback(self.flush_access)

    def flush_access(self) -> None:
        """Write the lines waiting, in writes of whole lines of at most
        PIPE_BUF bytes: several workers append to one file (or pipe), and
        such a write is never interleaved with another's."""
        lines, self._pending = self._pending, []
        if not lines or self._streams is None:
            return
        chunks, size, start = [], 0, 0
        for i, text in enumerate(lines):
            if size and size + len(text) >= select.PIPE_BUF:
                chunks.append("\n".join(lines[start:i]) + "\n")
                size, start = 0, i
            size += len(text) + 1
        chunks.append("\n".join(lines[start:]) + "\n")
        try:
            for handler in self._streams:
                stream = handler.stream  # looked up each time: reopened on USR1
                for chunk in chunks:
                    stream.write(chunk)
                    stream.flush()
        except Exception:
            self.exception("cannot write the access log")

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: timedelta) -> None:
        leaving = environ.get(HELD)
        if leaving is not None:  # a held stream parks (held.py): its line comes at its end
            leaving.request_time = request_time
            return
        # Every request ends here, logged or not: the moment to count it.
        metrics.observe_request(environ, resp.status, request_time.total_seconds())
        if not self.access_log_enabled:
            return
        if self.cfg.access_log_format != _DEFAULT_FORMAT:
            if self._record_atoms:
                environ = environ_atoms(environ)
            super().access(resp, req, environ, request_time)
            return
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        sent, total_ms = getattr(resp, "sent", None), request_time.total_seconds() * 1000
        text = json_line(environ, status, sent, total_ms) if self.json_lines else line(environ, status, sent, total_ms)
        try:
            self._write(text)
        except Exception:
            self.exception("cannot write the access log")


class JsonAccessLogger(AccessLogger):
    """The same facts, one JSON object a line ([log] format = json)."""

    json_lines = True


def _event_loop() -> Any:
    """The gevent loop of this worker, or None outside a gevent worker."""
    if not monkey.is_module_patched("socket"):
        return None
    return gevent.get_hub().loop


def _plain_streams(logger: logging.Logger) -> list[logging.StreamHandler[Any]] | None:
    """The handlers of gunicorn's own access log set-up (files or stdout,
    the message alone, nothing filtering), or None when a logconfig made
    something else of it: then lines go through logging as usual."""
    handlers = logger.handlers
    if not handlers or logger.filters or not logger.isEnabledFor(logging.INFO):
        return None
    streams: list[logging.StreamHandler[Any]] = []
    for handler in handlers:
        formatter = handler.formatter
        if (type(handler) not in (logging.StreamHandler, logging.FileHandler)
                or not isinstance(handler, logging.StreamHandler) or handler.filters
                or handler.level > logging.INFO or formatter is None or formatter._fmt != "%(message)s"):
            return None
        streams.append(handler)
    return streams
