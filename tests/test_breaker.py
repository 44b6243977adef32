"""The circuit breaker's rules, on a clock the test moves (no sleeping):
the one rule behind passive upstream health and the Redis storages'
back-off."""

from rproxy.upstreams.breaker import Breaker, State


def test_opens_after_threshold_failures_within_the_window_only():
    b = Breaker(threshold=3, window=10, backoff=5)
    assert not b.failed(0) and not b.failed(1)
    assert b.state(1) is State.CLOSED and b.usable(1)
    # The window turned over: counting starts again.
    assert not b.failed(20) and not b.failed(21)
    assert b.failed(22)
    assert b.state(22) is State.OPEN and not b.usable(26.9)
    assert b.retry_in(22) == 5


def test_after_the_backoff_one_call_tries_and_the_others_keep_off():
    b = Breaker(threshold=1, window=10, backoff=5)
    assert b.failed(0)
    assert b.state(5) is State.TRIAL and b.usable(5)
    assert b.allow(5)                      # the trial
    assert b.state(5.1) is State.TRYING
    assert not b.allow(5.1) and not b.usable(6)
    assert b.succeeded()
    assert b.state(6) is State.CLOSED and b.allow(6)
    assert not b.succeeded()               # closed already: nothing to report


def test_a_failed_trial_opens_it_again_at_once_whatever_the_threshold():
    b = Breaker(threshold=3, window=10, backoff=5)
    for t in (0, 1, 2):
        b.failed(t)
    assert b.state(7) is State.TRIAL
    b.claim(7)
    assert b.failed(7.5)
    assert b.state(8) is State.OPEN and b.retry_in(8) == 4.5


def test_late_failures_of_calls_begun_before_it_opened_change_nothing():
    b = Breaker(threshold=1, window=10, backoff=5)
    assert b.failed(0)
    assert not b.failed(1)
    assert b.state(5) is State.TRIAL


def test_a_trial_without_a_verdict_lets_the_next_call_try():
    b = Breaker(threshold=1, window=10, backoff=5)
    b.failed(0)
    assert b.allow(5)
    b.abandoned()
    assert b.allow(5.5)


def test_a_trial_that_never_reports_is_given_up_after_the_backoff():
    b = Breaker(threshold=1, window=10, backoff=5)
    b.failed(0)
    assert b.allow(5)
    assert not b.usable(9.9)
    assert b.usable(10.1)


def test_a_success_closes_it_from_any_state():
    for when in (1, 5):                    # open, trial
        b = Breaker(threshold=1, window=10, backoff=5)
        b.failed(0)
        assert b.succeeded() and b.state(when) is State.CLOSED
