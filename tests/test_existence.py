"""The existence cache and circuit breaker as units: TTLs, bounds, coalescing, breaker states.

The bucket is the real local stand-in server (tests/bucket.py), which also
plays the regional upstream registry for the signature fallback's check;
the HTTP path through the public port is covered in tests/test_server.py
and tests/test_signature_fallback.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from archeio.existence import CLOSED, HALF_OPEN, OPEN, BlobExistenceCache, CircuitBreaker

D = "sha256:" + "d" * 64
# The signature fallback's checks: content by digest in a repository of the regional upstream.
MANIFEST_KEY = "pause/manifests/" + D
OTHER_KEY = "other/manifests/" + D


def registry_url(bucket: Any, key: str) -> str:
    return f"{bucket.url}/v2/{key}"


def make(**overrides: Any) -> BlobExistenceCache:
    options: dict[str, Any] = dict(
        hit_ttl=60, miss_ttl=60, error_ttl=1, size=100, head_timeout=1.0,
        head_concurrency=10, breaker_failures=3, breaker_cooldown=10,
    )
    options.update(overrides)
    return BlobExistenceCache(**options)


def test_breaker_opens_after_consecutive_failures() -> None:
    breaker = CircuitBreaker("m", failures=3, cooldown=10)
    for now in (1.0, 2.0):
        breaker.record(False, now)
        assert breaker.state == CLOSED
    breaker.record(False, 3.0)
    assert breaker.state == OPEN
    assert not breaker.allow(5.0)


def test_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker("m", failures=3, cooldown=10)
    breaker.record(False, 1.0)
    breaker.record(False, 2.0)
    breaker.record(True, 3.0)
    breaker.record(False, 4.0)
    assert breaker.state == CLOSED


def test_breaker_probes_once_after_cooldown_and_closes_on_success() -> None:
    changes: list[tuple[str, str]] = []
    breaker = CircuitBreaker("m", failures=1, cooldown=10, on_change=lambda m, s: changes.append((m, s)))
    breaker.record(False, 0.0)
    assert breaker.allow(10.5)  # the probe
    assert breaker.state == HALF_OPEN
    assert not breaker.allow(10.6)  # only one probe at a time
    breaker.record(True, 10.7)
    assert breaker.state == CLOSED and breaker.allow(10.8)
    assert changes == [("m", OPEN), ("m", HALF_OPEN), ("m", CLOSED)]


def test_failed_probe_reopens_for_another_cooldown() -> None:
    breaker = CircuitBreaker("m", failures=1, cooldown=10)
    breaker.record(False, 0.0)
    assert breaker.allow(11.0)
    breaker.record(False, 11.5)
    assert breaker.state == OPEN
    assert not breaker.allow(20.0)
    assert breaker.allow(21.6)


def test_lost_probe_is_replaced_after_a_cooldown() -> None:
    breaker = CircuitBreaker("m", failures=1, cooldown=10)
    breaker.record(False, 0.0)
    assert breaker.allow(10.0)  # probe never reports back (request cancelled)
    assert not breaker.allow(15.0)
    assert breaker.allow(20.5)


async def test_check_caches_hits_and_misses(bucket: Any) -> None:
    bucket.add("m", D)
    cache = make()
    await cache.start()
    try:
        mirror, other = bucket.base("m"), bucket.base("n")
        assert cache.cached(mirror, D) is None
        assert await cache.check(mirror, D) is True
        assert await cache.check(other, D) is False
        assert cache.cached(mirror, D) is True
        assert cache.cached(other, D) is False
        assert cache.sizes == {"hits": 1, "misses": 1}
        assert sum(bucket.heads.values()) == 2
    finally:
        await cache.close()


async def test_caches_are_bounded_separately(bucket: Any) -> None:
    bucket.add("m", D)
    cache = make(size=5, head_concurrency=100)
    await cache.start()
    try:
        mirror = bucket.base("m")
        await cache.check(mirror, D)
        # A flood of misses fills the miss cache but cannot evict the hit.
        await asyncio.gather(*(cache.check(mirror, f"sha256:{i:064x}") for i in range(50)))
        assert cache.sizes["hits"] == 1 and 2 <= cache.sizes["misses"] <= 5
        assert cache.cached(mirror, D) is True
    finally:
        await cache.close()


async def test_miss_expires_after_its_ttl(bucket: Any) -> None:
    cache = make(miss_ttl=0.1)
    await cache.start()
    try:
        mirror = bucket.base("m")
        assert await cache.check(mirror, D) is False
        assert cache.cached(mirror, D) is False
        bucket.add("m", D)
        for _ in range(100):
            if cache.cached(mirror, D) is None:
                break
            await asyncio.sleep(0.02)
        assert cache.cached(mirror, D) is None
        assert await cache.check(mirror, D) is True
    finally:
        await cache.close()


async def test_checks_beyond_the_cap_are_not_queued(bucket: Any) -> None:
    bucket.delay = 0.5
    cache = make(head_concurrency=2)
    await cache.start()
    try:
        mirror = bucket.base("m")
        results = await asyncio.gather(*(cache.check(mirror, f"sha256:{i:064x}") for i in range(6)))
        assert results == [False] * 6
        assert cache.count("over_capacity") == 4
        assert sum(bucket.heads.values()) == 2
    finally:
        await cache.close()


@pytest.mark.parametrize("kind", ["mirror", "registry"])
async def test_concurrent_checks_of_one_key_share_a_head(bucket: Any, kind: str) -> None:
    bucket.delay = 0.2
    cache = make()
    if kind == "mirror":
        bucket.add("m", D)
        key = f"m/{D}"

        def check() -> Any:
            return cache.check(bucket.base("m"), D)
    else:  # the signature fallback's check of the regional upstream
        bucket.add_to_registry("pause", D)
        key = f"registry/pause/{D}"

        def check() -> Any:
            return cache.check_registry(bucket.url, MANIFEST_KEY, registry_url(bucket, MANIFEST_KEY))
    try:
        results = await asyncio.gather(*(check() for _ in range(10)))
        assert results == [True] * 10
        assert bucket.heads[key] == 1
        assert cache.count("coalesced") == 9
    finally:
        await cache.close()


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_server_errors_open_the_breaker_and_answer_false(bucket: Any, status: int) -> None:
    bucket.add("m", D)
    bucket.status = status
    cache = make(breaker_failures=2, error_ttl=0)
    await cache.start()
    try:
        mirror = bucket.base("m")
        for i in range(2):
            assert await cache.check(mirror, f"sha256:{i:064x}") is False
        assert cache.breakers[mirror].state == OPEN
        # Open: even a blob the mirror holds is not trusted, without a HEAD.
        heads = sum(bucket.heads.values())
        assert cache.cached(mirror, D) is False
        assert sum(bucket.heads.values()) == heads
    finally:
        await cache.close()


def test_expiring_set_forgets_within_its_ttl_whenever_it_rotates() -> None:
    from archeio.existence import ExpiringSet

    seen = ExpiringSet(ttl=10, capacity=100, now=0.0)
    seen.add("m", "a", 1.0)
    assert seen.has("m", "a", 5.9)  # young
    assert seen.has("m", "a", 9.0)  # rotated at 5: old, learnt in the generation begun at 0
    assert not seen.has("m", "a", 10.0)  # one ttl after its generation began: gone
    assert not seen.has("n", "a", 2.0)  # per mirror


def test_expiring_set_idle_for_a_whole_ttl_forgets_everything() -> None:
    from archeio.existence import ExpiringSet

    seen = ExpiringSet(ttl=10, capacity=100, now=0.0)
    seen.add("m", "a", 4.0)
    assert not seen.has("m", "a", 30.0)  # the first rotation comes late: nothing survives it


def test_expiring_set_holds_at_most_its_capacity() -> None:
    from archeio.existence import ExpiringSet

    seen = ExpiringSet(ttl=3600, capacity=10, now=0.0)
    for n in range(1000):
        seen.add("m", str(n), 1.0)
        assert len(seen) <= 10
    assert seen.has("m", "999", 1.0) and not seen.has("m", "0", 1.0)


# -- the registry check of the signature fallback: content by digest, by repository ---------

async def test_registry_check_is_keyed_by_repository_not_by_digest_alone(bucket: Any) -> None:
    bucket.add_to_registry("pause", D)
    cache = make()
    try:
        assert await cache.check_registry(bucket.url, MANIFEST_KEY, registry_url(bucket, MANIFEST_KEY)) is True
        # The same digest in another repository is another question, with its own answer.
        assert cache.cached(bucket.url, OTHER_KEY) is None
        assert await cache.check_registry(bucket.url, OTHER_KEY, registry_url(bucket, OTHER_KEY)) is False
        assert (cache.cached(bucket.url, MANIFEST_KEY), cache.cached(bucket.url, OTHER_KEY)) == (True, False)
        assert bucket.heads == {f"registry/pause/{D}": 1, f"registry/other/{D}": 1}
    finally:
        await cache.close()


async def test_registry_check_accepts_every_manifest_and_index_media_type(bucket: Any) -> None:
    cache = make()
    try:
        await cache.check_registry(bucket.url, MANIFEST_KEY, registry_url(bucket, MANIFEST_KEY))
        accepted = {part.strip() for part in (bucket.accepts[f"registry/pause/{D}"] or "").split(",")}
        assert accepted == {
            "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        }
    finally:
        await cache.close()


async def test_registry_has_a_breaker_of_its_own(bucket: Any) -> None:
    bucket.status = 503
    cache = make(breaker_failures=2, error_ttl=0)
    try:
        for key in ("a/manifests/" + D, "b/manifests/" + D):
            assert await cache.check_registry(bucket.url, key, registry_url(bucket, key)) is False
        assert cache.breakers[bucket.url].state == OPEN
        assert bucket.base("m") not in cache.breakers  # the mirrors' breakers are untouched
        heads = sum(bucket.heads.values())
        assert cache.cached(bucket.url, "c/manifests/" + D) is False  # open: "not there", no HEAD
        assert sum(bucket.heads.values()) == heads
    finally:
        await cache.close()


async def test_registry_checks_count_against_the_same_head_cap(bucket: Any) -> None:
    bucket.delay = 0.5
    cache = make(head_concurrency=2)
    try:
        keys = [f"r{i}/manifests/{D}" for i in range(3)]
        results = await asyncio.gather(cache.check(bucket.base("m"), D),
                                       *(cache.check_registry(bucket.url, k, registry_url(bucket, k)) for k in keys))
        assert results == [False] * 4 and cache.count("over_capacity") == 2
    finally:
        await cache.close()


@pytest.mark.parametrize(
    ("status", "registry", "outcome"),
    [
        (200, False, "hit"), (200, True, "hit"),
        (404, False, "miss"), (404, True, "miss"),
        (403, False, "forbidden"), (403, True, "forbidden"), (401, True, "miss"),
        # A registry may answer a blob with a redirect to its storage: it holds it. A bucket's redirect is not it.
        (307, True, "hit"), (302, True, "hit"), (307, False, "miss"),
        (500, True, "error"), (503, False, "error"), (429, True, "error"), (429, False, "error"),
    ],
)
def test_head_status_means(status: int, registry: bool, outcome: str) -> None:
    from archeio.existence import head_outcome

    assert head_outcome(status, registry) == outcome


@pytest.mark.parametrize("status", [401, 403])
async def test_registry_refusal_is_absent_and_does_not_open_the_breaker(bucket: Any, status: int) -> None:
    bucket.add_to_registry("pause", D)
    bucket.status = status
    cache = make(breaker_failures=1)
    try:
        assert await cache.check_registry(bucket.url, MANIFEST_KEY, registry_url(bucket, MANIFEST_KEY)) is False
        assert cache.breakers[bucket.url].state == CLOSED
        assert cache.cached(bucket.url, MANIFEST_KEY) is False  # remembered as a miss
    finally:
        await cache.close()
