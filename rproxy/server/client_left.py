"""Requests whose client left (an HTTP/2 stream reset, its connection lost,
an HTTP/1.x client's connection closed) stop waiting on their upstream, and
give its connection back, as nginx does unless told to ignore client aborts.

The server side says which request greenlet's client left: http2.py at
once, and for HTTP/1.x the worker's sweep (Waiting.sweep, once a second)
by one poll over the sockets of the requests that have been waiting since
the sweep before: a long poll or an event stream whose client closed (or
half-closed, as nginx takes it too) frees its upstream connection within
two seconds instead of when the upstream next sends. The forwarder marks
the spans in which a greenlet waits on its upstream (for a free connection,
the response head, the next body bytes). A greenlet in such a wait is
interrupted with ClientLeft; one between waits gets it when it begins the
next. Kept free of imports beyond gevent: the worker module that gunicorn's
master imports uses it, and the master must not import urllib3 (and so ssl)
before the worker has monkey-patched them.
"""

from __future__ import annotations

import select
from typing import TYPE_CHECKING, Iterable

import gevent
from gevent import monkey

if TYPE_CHECKING:
    from greenlet import greenlet


class ClientLeft(BaseException):
    """Thrown into a request's greenlet whose client left. A BaseException,
    as gevent's own Timeout and GreenletExit: no handler of upstream errors
    (`except Exception`) takes it for one, and every path out of an upstream
    wait releases or discards its connection."""


# The peer shut its side (FIN), its connection failed or was reset. Linux's
# POLLRDHUP reports the FIN even behind unread bytes (a TLS close_notify).
_GONE = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR


class Waiting:
    def __init__(self) -> None:
        self._now: set[greenlet] = set()          # waiting on an upstream now
        self._client_left: set[greenlet] = set()  # client left before their next wait
        self._clients: dict[greenlet, int] = {}   # an HTTP/1.x request's client socket (fd)
        self._suspects: set[greenlet] = set()     # waiting at the last sweep

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

    def serving(self, greenlet: greenlet, fileno: int) -> None:
        """An HTTP/1.x request's greenlet, and its client's socket, for the sweep."""
        self._clients[greenlet] = fileno

    def served(self, greenlet: greenlet) -> None:
        del self._clients[greenlet]
        self.forget(greenlet)

    def sweep(self) -> None:
        """Cut short the upstream waits of HTTP/1.x requests whose client
        has closed its connection: those waiting now and at the sweep
        before (so a request is never cut within its first second). One
        non-blocking poll for them all (the real poll: gevent's would
        wait in the hub). Run by the worker from its loop."""
        clients = self._clients
        waiting = {g for g in self._now if g in clients}
        suspects, self._suspects = waiting & self._suspects, waiting
        if not suspects:
            return
        by_fd = {clients[g]: g for g in suspects}
        for fd in _gone(by_fd):
            self.cut_short(by_fd[fd])


def has_left(fileno: int) -> bool:
    """Has the client of this socket closed (or half-closed) its connection?"""
    return bool(_gone((fileno,)))


def _gone(fds: Iterable[int]) -> list[int]:
    """Those of `fds` whose peer closed: one non-blocking poll (the real
    one: gevent's would wait in the hub)."""
    poll: select.poll = monkey.get_original("select", "poll")()
    for fd in fds:
        poll.register(fd, _GONE)
    return [fd for fd, _events in poll.poll(0)]


waiting = Waiting()
