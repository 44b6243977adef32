"""The head deadlines of the worker's client connections: one timer per
HTTP/1 connection greenlet, thrown into it when it fires.

- the first request head must arrive within `client_header_timeout`, each
  next one within `keepalive` from the end of the previous response
  (slowloris): the worker answers 408, or closes quietly when the
  connection was just idle;
- after a response, when `keepalive` is longer than PARK_AFTER, the wait is
  cut in two: a connection still idle at PARK_AFTER is parked
  (keepalive.Park, parking.py), one whose head is coming gets the rest.

A timer rather than gevent.Timeout: no exception object per request, and a
new timer each time, since libev restarts a stopped timer with the time it
had left, not the whole timeout.
"""

from __future__ import annotations

from typing import Any

import gevent

from rproxy.server.parking import PARK_AFTER
from rproxy.server.request_parser import parsers


class HeadTimeout(Exception):
    """The client did not finish a request head in time. Thrown as a class
    (the instance is made only if the timer fires): an idle keep-alive
    connection holds no exception object, only its timer."""

    first: bool


class FirstHeadTimeout(HeadTimeout):
    first = True


class NextHeadTimeout(HeadTimeout):
    first = False


class Park(Exception):
    """Thrown (as a class) into a connection's greenlet idle in its wait for
    the next request: park the connection (keepalive.py)."""


def _expire(greenlet: Any, exception: type[BaseException]) -> None:
    greenlet.throw(exception)


def _idle_a_while(deadlines: Deadlines, greenlet: Any) -> None:
    parser = parsers.get(greenlet)
    if parser is not None and parser.idle:
        greenlet.throw(Park)
    else:  # its next head is coming (or TLS, which is not parked): the rest of the time
        deadlines.timers[greenlet] = deadlines._arm(deadlines.keepalive - PARK_AFTER, NextHeadTimeout, greenlet)


def disarm(timer: Any) -> None:
    if timer is not None:
        timer.close()


class Deadlines:
    """Each connection greenlet's timer (a gevent.local would cost an idle
    keep-alive connection a dict of its own)."""

    def __init__(self, loop: Any, header_timeout: float, keepalive: float) -> None:
        self.loop = loop
        self.header_timeout = header_timeout
        self.keepalive = keepalive
        self.timers: dict[Any, Any] = {}  # greenlet -> its timer, or None

    def first_head(self) -> None:
        self.timers[gevent.getcurrent()] = self._arm(self.header_timeout, FirstHeadTimeout, gevent.getcurrent())

    def resumed(self, until: float) -> None:
        """A parked connection's next head: within the rest of its keep-alive time."""
        left = max(until - self.loop.now(), 0.001)
        self.timers[gevent.getcurrent()] = self._arm(left, NextHeadTimeout, gevent.getcurrent())

    def head_in(self, greenlet: Any) -> None:
        """The head is in (a request starts), or the connection is HTTP/2."""
        disarm(self.timers[greenlet])
        self.timers[greenlet] = None  # not kept, closed, for as long as the response takes

    def response_done(self, greenlet: Any) -> None:
        if self.keepalive <= PARK_AFTER:
            self.timers[greenlet] = self._arm(self.keepalive, NextHeadTimeout, greenlet)
            return
        timer = self.loop.timer(PARK_AFTER, priority=-1)
        timer.start(_idle_a_while, self, greenlet, update=True)
        self.timers[greenlet] = timer

    def end(self, greenlet: Any) -> None:
        disarm(self.timers.pop(greenlet))

    def _arm(self, seconds: float, exception: type[HeadTimeout], greenlet: Any) -> Any:
        """A started timer that throws `exception` into `greenlet`, or None."""
        if not seconds:
            return None
        timer = self.loop.timer(seconds, priority=-1)
        timer.start(_expire, greenlet, exception, update=True)
        return timer
