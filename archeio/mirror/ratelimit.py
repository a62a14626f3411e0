"""Politeness towards the source registry: a request-rate limit, a concurrency
limit and retries with backoff.

The rate limit spaces requests evenly (one every `1/rate` seconds, with a
small burst allowance) rather than letting a full second's worth out at once:
registries count quotas per minute (Artifact Registry: 5,000 requests a
minute, hence upstream's 80 requests a second), and an even flow keeps us
under any window a quota might be measured over.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

# Statuses worth another try: the registry asks us to slow down (429) or
# failed on its side (5xx); 501 "not implemented" will not get better.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class RateLimiter:
    """At most `rate` acquisitions a second on average, at most `burst` at once.

    A virtual-clock scheduler (the generic cell rate algorithm): each caller
    reserves the next free slot and sleeps until it. Callers are served in
    the order they arrive, so none starves.
    """

    def __init__(self, rate: float, burst: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        if burst < 1:
            raise ValueError("burst must be 1 or more")
        self.rate = rate
        self._interval = 1.0 / rate
        # How far ahead of now the schedule may run before callers wait:
        # `burst` requests may start together after an idle spell.
        self._tolerance = (burst - 1) * self._interval
        self._clock = clock
        self._tat = 0.0  # theoretical arrival time of the next request

    def reserve(self) -> float:
        """Reserve the next slot; return the seconds to wait before using it.

        Over any window of `w` seconds at most `rate * w + burst` requests start.
        """
        now = self._clock()
        tat = max(self._tat, now)
        self._tat = tat + self._interval
        return max(0.0, tat - self._tolerance - now)

    async def acquire(self) -> None:
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)


class SourceLimits:
    """The rate limiter and the in-flight bound, shared by every source request."""

    def __init__(self, rate: float, concurrency: int, burst: int = 1) -> None:
        self.rate = RateLimiter(rate, burst)
        self.in_flight = asyncio.Semaphore(concurrency)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """The delay a `Retry-After` header asks for (seconds or an HTTP date), if any."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


class Backoff:
    """Exponential backoff with full jitter, capped; a `Retry-After` wins when longer."""

    def __init__(self, attempts: int = 5, base: float = 0.5, cap: float = 30.0,
                 jitter: Callable[[], float] = random.random) -> None:
        self.attempts = attempts
        self.base = base
        self.cap = cap
        self._jitter = jitter

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try number `attempt + 1` (`attempt` counts from 1)."""
        ceiling = min(self.cap, self.base * 2.0 ** (attempt - 1))
        wait = ceiling * (0.5 + 0.5 * self._jitter())
        if retry_after is not None:
            # The server knows its quota window; never retry sooner than asked,
            # but do not let a hostile header park us for hours either.
            wait = max(wait, min(retry_after, 10 * self.cap))
        return wait
