"""A circuit breaker: the one rule by which rproxy stops using something
that keeps failing, and tries it again later.

`threshold` failures within `window` seconds open the breaker: the thing
(an upstream server, a Redis storage) is left alone for `backoff` seconds.
Then one call may try it while the others still keep off; its success
closes the breaker, its failure opens it again at once. A trial that ends
without a verdict (the client went away first) lets the next call try; one
that never reports is given up after `backoff`, so a breaker never stays
half-open for good.

    CLOSED --threshold failures in window--> OPEN --backoff over--> TRIAL
    TRIAL --claimed by a call--> TRYING --success--> CLOSED
                                        --failure--> OPEN
                                        --no verdict--> TRIAL
    any state --success--> CLOSED

The caller passes the time (monotonic seconds), so the rules are tested
without sleeping, and logs and counts the transitions each method reports.
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    CLOSED = "closed"   # in use
    OPEN = "open"       # failing: left alone until the back-off is over
    TRIAL = "trial"     # back-off over: the next call tries it
    TRYING = "trying"   # one call is trying it; the others keep off


class Breaker:
    __slots__ = ("threshold", "window", "backoff", "fails", "window_start", "until", "trying_until")

    def __init__(self, threshold: int, window: float, backoff: float):
        self.threshold = threshold
        self.window = window
        self.backoff = backoff
        self.fails = 0              # failures in the current window, while closed
        self.window_start = 0.0
        self.until = 0.0            # 0: closed; else the end of the back-off
        self.trying_until = 0.0     # a trial call is under way until then

    def state(self, now: float) -> State:
        if not self.until:
            return State.CLOSED
        if self.until > now:
            return State.OPEN
        return State.TRYING if self.trying_until > now else State.TRIAL

    def usable(self, now: float) -> bool:
        """May a call use it now (closed, or a trial nobody has claimed)?"""
        return not self.until or (self.until <= now and self.trying_until <= now)

    def claim(self, now: float) -> None:
        """The call about to use it: if this is the trial, the others keep off."""
        if self.until:
            self.trying_until = now + self.backoff

    def allow(self, now: float) -> bool:
        """usable, and claimed if so: for a caller with nothing to choose between."""
        if not self.until:
            return True
        if self.usable(now):
            self.claim(now)
            return True
        return False

    def failed(self, now: float) -> bool:
        """A call failed. True when this opened the breaker (again)."""
        if self.until:
            if self.until > now:
                return False  # already open: a call that began before it opened
            self.until, self.trying_until = now + self.backoff, 0.0
            return True
        if now - self.window_start > self.window:
            self.window_start, self.fails = now, 0
        self.fails += 1
        if self.fails < self.threshold:
            return False
        self.until, self.fails = now + self.backoff, 0
        return True

    def succeeded(self) -> bool:
        """A call succeeded. True when this closed an open breaker."""
        was_open = bool(self.until)
        self.until = self.trying_until = 0.0
        self.fails = 0
        return was_open

    def abandoned(self) -> None:
        """The trial call ended without a verdict: the next call may try."""
        self.trying_until = 0.0

    def retry_in(self, now: float) -> float:
        """Seconds until a call may try it (0: now, or a trial is under way)."""
        return max(0.0, self.until - now) if self.until else 0.0
