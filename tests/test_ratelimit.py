"""The per-client token bucket (archeio/ratelimit.py), on a clock the tests move.

Request-level behaviour (the 429 on both engines, which address is the key,
the metrics) is in test_rate_limit_requests.py.
"""

from __future__ import annotations

import tracemalloc

import pytest

from archeio.config import SETTINGS
from archeio.ratelimit import MAX_KEY_LENGTH, RateLimiter, retry_after, too_many_requests

DEFAULT_CLIENTS = int(next(s.default for s in SETTINGS if s.env == "ARCHEIO_RATE_CLIENTS"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(rate: float, burst: int, max_clients: int = 1000) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    return RateLimiter(rate, burst, max_clients, clock=clock), clock


def taken(limit: RateLimiter, key: str, times: int) -> list[bool]:
    return [limit.wait(key) == 0.0 for _ in range(times)]


def test_a_new_client_may_send_exactly_the_burst_at_once() -> None:
    limit, _ = limiter(rate=2.0, burst=5)
    assert taken(limit, "a", 6) == [True] * 5 + [False]


def test_one_token_comes_back_every_interval() -> None:
    limit, clock = limiter(rate=4.0, burst=2)
    taken(limit, "a", 2)
    clock.now += 0.25
    assert taken(limit, "a", 2) == [True, False]


def test_refill_stops_at_the_burst() -> None:
    limit, clock = limiter(rate=4.0, burst=3)
    taken(limit, "a", 3)
    clock.now += 3600
    assert taken(limit, "a", 4) == [True, True, True, False]


def test_a_refused_request_takes_no_token() -> None:
    limit, clock = limiter(rate=1.0, burst=1)
    taken(limit, "a", 1)
    assert taken(limit, "a", 50) == [False] * 50
    clock.now += 1.0
    assert taken(limit, "a", 2) == [True, False]


def test_wait_is_the_time_until_the_next_token() -> None:
    limit, clock = limiter(rate=0.5, burst=1)  # a token every 2 s
    taken(limit, "a", 1)
    clock.now += 0.5
    assert limit.wait("a") == pytest.approx(1.5)
    clock.now += 1.5 - 1e-6
    assert 0 < limit.wait("a") <= 1e-6 * 1.01
    clock.now += 1e-6
    assert limit.wait("a") == 0.0


@pytest.mark.parametrize(("wait", "header"), [(1e-9, 1), (0.5, 1), (1.0, 1), (1.000001, 2), (29.2, 30)])
def test_retry_after_is_whole_seconds_rounded_up(wait: float, header: int) -> None:
    assert retry_after(wait) == header


def test_retry_after_at_the_edge_is_a_token_away() -> None:
    # Rate 1/3 s: refused 1 s after the last token, a token is 2 s away.
    limit, clock = limiter(rate=1 / 3, burst=1)
    taken(limit, "a", 1)
    clock.now += 1.0
    seconds = retry_after(limit.wait("a"))
    assert seconds == 2
    clock.now += seconds - 1e-3
    assert limit.wait("a") > 0
    clock.now += 1e-3
    assert limit.wait("a") == 0.0


def test_clients_have_buckets_of_their_own() -> None:
    limit, _ = limiter(rate=1.0, burst=2)
    assert taken(limit, "a", 3) == [True, True, False]
    assert taken(limit, "b", 3) == [True, True, False]


def test_too_many_requests_answer_is_an_oci_429_with_retry_after() -> None:
    answer = too_many_requests(7)
    assert (answer.status, answer.code, answer.content_type) == (429, "TOOMANYREQUESTS", "application/json")
    assert answer.headers == (("Retry-After", "7"),)
    assert b'"code": "TOOMANYREQUESTS"' in answer.body


# -- the bound ---------------------------------------------------------------------------


def test_table_never_holds_more_than_its_bound() -> None:
    limit, _ = limiter(rate=1.0, burst=10, max_clients=8)
    for i in range(100):
        limit.wait(f"10.0.0.{i}")
        assert len(limit) <= 8


def test_full_buckets_are_forgotten_first_and_not_counted() -> None:
    limit, clock = limiter(rate=1.0, burst=10, max_clients=8)
    for i in range(8):
        limit.wait(f"old-{i}")
    clock.now += 1.0  # each old bucket (one token short) is full again
    limit.wait("new")
    assert len(limit) == 1 and limit.forgotten == 0


def test_at_the_bound_the_buckets_nearest_to_full_go_and_are_counted() -> None:
    limit, _ = limiter(rate=1.0, burst=100, max_clients=8)
    taken(limit, "heavy", 50)  # 50 tokens short
    for i in range(7):
        limit.wait(f"light-{i}")  # 1 token short each
    limit.wait("newcomer")  # the table is full: a quarter is made free
    assert len(limit) == 8 * 3 // 4 + 1
    assert limit.forgotten == 8 - 8 * 3 // 4
    # The client furthest over its rate is still remembered: not a token more for it.
    assert taken(limit, "heavy", 51) == [True] * 50 + [False]


def test_a_forgotten_client_starts_again_with_a_full_bucket() -> None:
    limit, _ = limiter(rate=1.0, burst=2, max_clients=1)
    taken(limit, "a", 2)
    limit.wait("b")  # forgets a
    assert limit.forgotten == 1
    assert taken(limit, "a", 3) == [True, True, False]


def test_a_sweep_frees_a_quarter_so_the_next_newcomers_need_none() -> None:
    limit, _ = limiter(rate=1.0, burst=10, max_clients=16)
    for i in range(16):
        limit.wait(f"c{i}")
    limit.wait("n0")
    after_sweep = limit.forgotten
    for i in range(1, 4):  # the quarter freed takes 3 more without another sweep
        limit.wait(f"n{i}")
    assert limit.forgotten == after_sweep and len(limit) == 16


# 12,289 buckets: just past a resize of the table, its emptiest (most bytes a bucket).
@pytest.mark.parametrize("max_clients", [DEFAULT_CLIENTS, 12289])
def test_a_full_table_of_the_longest_keys_takes_at_most_180_bytes_a_client(max_clients: int) -> None:
    # The figure ARCHEIO_RATE_CLIENTS's help gives, and the deploy files' memory arithmetic uses.
    clock = Clock()
    tracemalloc.start()
    try:
        limit = RateLimiter(1.0, 10, max_clients, clock=clock)
        for i in range(max_clients):
            limit.wait(f"{i:0{MAX_KEY_LENGTH}d}")  # made here, so counted: a key of its own, as a request's
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(limit) == max_clients
    assert used / max_clients <= 180

