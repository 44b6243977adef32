"""Requests whose client left (an HTTP/2 stream reset, its connection lost)
stop waiting on their upstream at once.

The server side (http2.py) says which request greenlet's client left; the
forwarder marks the spans in which a greenlet waits on its upstream (for a
free connection, the response head, the next body bytes). A greenlet in such
a wait is interrupted with ClientLeft; one between waits gets it when it
begins the next. Kept free of imports beyond gevent: the worker module that
gunicorn's master imports uses it, and the master must not import urllib3
(and so ssl) before the worker has monkey-patched them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gevent

if TYPE_CHECKING:
    from greenlet import greenlet


class ClientLeft(BaseException):
    """Thrown into a request's greenlet whose client left. A BaseException,
    as gevent's own Timeout and GreenletExit: no handler of upstream errors
    (`except Exception`) takes it for one, and every path out of an upstream
    wait releases or discards its connection."""


class Waiting:
    def __init__(self) -> None:
        self._now: set[greenlet] = set()          # waiting on an upstream now
        self._client_left: set[greenlet] = set()  # client left before their next wait

    def begins(self) -> greenlet:
        """The current greenlet is about to wait on its upstream: returns it
        for discard(), or raises ClientLeft when its client has left."""
        me: greenlet = gevent.getcurrent()
        if me in self._client_left:
            raise ClientLeft()
        self._now.add(me)
        return me

    def discard(self, greenlet: greenlet) -> None:
        """The wait begun by begins() is over."""
        self._now.discard(greenlet)

    def cut_short(self, greenlet: greenlet) -> None:
        """The client of the request `greenlet` serves has left: stop its
        upstream wait now if it is in one, else when it begins the next.
        Called from the hub (a loop callback), never by the greenlet itself."""
        if greenlet in self._now:
            greenlet.throw(ClientLeft())
        elif not greenlet.dead:
            self._client_left.add(greenlet)

    def forget(self, greenlet: greenlet) -> None:
        """The greenlet is done with its request."""
        self._client_left.discard(greenlet)


waiting = Waiting()
