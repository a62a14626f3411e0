"""The mirror's politeness: the request-rate limiter, Retry-After and backoff."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate

import pytest

from archeio.mirror.ratelimit import Backoff, RateLimiter, retry_after_seconds


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def start_times(limiter: RateLimiter, clock: FakeClock, requests: int, arrivals: float = 0.0) -> list[float]:
    """When each request may start, if one arrives every `arrivals` seconds and waits as told."""
    starts = []
    for i in range(requests):
        clock.now = 1000.0 + i * arrivals
        starts.append(clock.now + limiter.reserve())
    return starts


@pytest.mark.parametrize("rate, burst", [(80, 1), (80, 8), (5, 1), (1000, 50)])
def test_no_window_holds_more_than_rate_times_length_plus_burst(rate: float, burst: int) -> None:
    clock = FakeClock()
    starts = start_times(RateLimiter(rate, burst, clock=clock), clock, 400)
    for window in (0.05, 0.5, 1.0, 2.0):
        for first in starts:
            inside = sum(1 for s in starts if first <= s < first + window)
            assert inside <= rate * window + burst


def test_requests_are_spaced_evenly_not_sent_in_bursts() -> None:
    clock = FakeClock()
    starts = start_times(RateLimiter(80, 1, clock=clock), clock, 10)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps == pytest.approx([1 / 80] * 9)


def test_a_slow_caller_is_never_delayed() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, 1, clock=clock)
    starts = start_times(limiter, clock, 5, arrivals=0.5)
    assert starts == [1000.0 + 0.5 * i for i in range(5)]


def test_burst_lets_that_many_start_at_once_after_idling() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, 4, clock=clock)
    delays = [limiter.reserve() for _ in range(6)]
    assert delays[:4] == pytest.approx([0, 0, 0, 0], abs=1e-9)
    assert delays[4] == pytest.approx(0.1)
    assert delays[5] == pytest.approx(0.2)


@pytest.mark.parametrize("rate, burst", [(0, 1), (-1, 1), (10, 0)])
def test_limiter_refuses_nonsense(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, burst)


async def test_acquire_sleeps_for_the_reserved_delay() -> None:
    limiter = RateLimiter(50, 1)
    await limiter.acquire()
    reserved = limiter.reserve()  # the slot after the one just taken
    assert 0 < reserved <= 1 / 50 + 0.001
    started = time.monotonic()
    await asyncio.gather(*(limiter.acquire() for _ in range(3)))
    # Three more slots after the reserved one: at least two more intervals pass.
    assert time.monotonic() - started >= 2 / 50


@pytest.mark.parametrize("header, expected", [
    ("7", 7.0),
    (" 0 ", 0.0),
    (None, None),
    ("", None),
    ("soon", None),
    ("-3", None),
])
def test_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert retry_after_seconds(header) == expected


def test_retry_after_http_date_is_seconds_from_now() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30)
    assert retry_after_seconds(formatdate(now - 30, usegmt=True), now=now) == 0.0


def test_backoff_grows_exponentially_up_to_its_cap() -> None:
    backoff = Backoff(attempts=10, base=0.5, cap=4.0, jitter=lambda: 1.0)
    assert [backoff.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_backoff_jitter_stays_within_half_to_full_delay() -> None:
    low = Backoff(base=1.0, jitter=lambda: 0.0).delay(3)
    high = Backoff(base=1.0, jitter=lambda: 1.0).delay(3)
    assert (low, high) == (2.0, 4.0)


def test_backoff_waits_at_least_what_retry_after_asks_but_not_for_hours() -> None:
    backoff = Backoff(base=0.5, cap=30.0, jitter=lambda: 1.0)
    assert backoff.delay(1, retry_after=12) == 12
    assert backoff.delay(1, retry_after=0) == 0.5
    assert backoff.delay(1, retry_after=86400) == 300
