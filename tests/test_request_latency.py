"""The latency histogram of the public port, `archeio_request_duration_seconds`: what one observation is.

An observation runs from the start of the read that completed a request to
the hand-over of its answer to the transport (docs/operations.md), and it
is also what counts the answer. The tests hold an existence check at the
mirror for a known time and read the histogram the admin port would
render: the observation must be at least that long and no longer than the
client waited, and land in the bucket its value belongs to. Pipelined,
queued and refused requests are each counted once, under their own kind
and status class. Every test runs on both engines.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from archeio.metrics import REQUEST_BUCKETS, RequestLatency, render
from archeio.server import Server

from .reliability_support import (
    AWS_EU_WEST_3,
    GATE,
    AsyncClient,
    blob_path,
    digest,
    port_of,
    request_bytes,
    server_with_mirror,
    wait_until,
    xff,
)

pytestmark = pytest.mark.usefixtures("engine")

HELD = 0.3  # seconds the mirror holds the check
MANIFEST = "/v2/pause/manifests/3.9"


class Histogram:
    """One (kind, status class) series of the rendered histogram."""

    def __init__(self, server: Server, kind: str, status_class: str) -> None:
        text = render(server).decode()
        labels = {"kind": kind, "status_class": status_class}
        self.buckets: dict[float, float] = {}
        self.count = self.sum = 0.0
        for family in text_string_to_metric_families(text):
            if family.name != "archeio_request_duration_seconds":
                continue
            for sample in family.samples:
                if any(sample.labels.get(k) != v for k, v in labels.items()):
                    continue
                if sample.name.endswith("_bucket"):
                    self.buckets[float(sample.labels["le"])] = sample.value
                elif sample.name.endswith("_count"):
                    self.count = sample.value
                elif sample.name.endswith("_sum"):
                    self.sum = sample.value

    def holds_one_observation_of(self, seconds: float) -> bool:
        """Is every bucket at or above `seconds` 1 and every one below it 0?"""
        return self.count == 1 and all(n == (1 if seconds <= le else 0) for le, n in self.buckets.items())


async def hold_check(mirror: object, client: AsyncClient, raw: bytes) -> float:
    """Send `raw`, whose first request is a blob the mirror holds for HELD seconds; when it was sent."""
    sent = time.monotonic()
    await client.send(raw)
    await wait_until(lambda: mirror.in_flight == 1, "the existence check to reach the mirror")  # type: ignore[attr-defined]
    # The server read the request before it asked the mirror: its observation is at least HELD.
    await asyncio.sleep(HELD)
    mirror.release()  # type: ignore[attr-defined]
    return sent


async def test_an_answer_after_a_held_check_is_observed_from_its_request_to_its_answer(tmp_path: Path) -> None:
    async with server_with_mirror(tmp_path, ARCHEIO_HEAD_TIMEOUT="30") as (server, mirror):
        mirror.present.add(digest(1))
        mirror.mode = GATE
        client = await AsyncClient.connect(port_of(server))
        sent = await hold_check(mirror, client, request_bytes("GET", blob_path(digest(1)), xff(AWS_EU_WEST_3),
                                                              close=False))
        response = await client.read_response()
        waited = time.monotonic() - sent
        await client.close()
        assert response.status == 307
        blob = Histogram(server, "blob", "3xx")
        # The sum of one observation is its value: at least the hold, at most the client's wait.
        assert HELD <= blob.sum <= waited
        assert blob.holds_one_observation_of(blob.sum), blob.buckets
        assert blob.buckets[0.25] == 0
        if waited <= 0.5:
            assert blob.buckets[0.5] == 1


async def test_an_answer_given_at_once_is_observed_once(tmp_path: Path) -> None:
    async with server_with_mirror(tmp_path) as (server, _mirror):
        client = await AsyncClient.connect(port_of(server))
        sent = time.monotonic()
        response = await client.get(MANIFEST)
        waited = time.monotonic() - sent
        await client.close()
        assert response.status == 307
        manifest = Histogram(server, "manifest", "3xx")
        assert 0 < manifest.sum <= waited
        assert manifest.holds_one_observation_of(manifest.sum), manifest.buckets


async def test_pipelined_answers_are_each_observed_under_their_own_kind_and_class(tmp_path: Path) -> None:
    async with server_with_mirror(tmp_path) as (server, _mirror):
        client = await AsyncClient.connect(port_of(server))
        # One write, three requests: the lean engine answers them in one read callback.
        await client.send(b"".join(request_bytes("GET", target, close=False) for target in (
            MANIFEST, "/v2/pause/manifests/.bad", MANIFEST,
        )))
        statuses = [(await client.read_response()).status for _ in range(3)]
        await client.close()
        assert statuses == [307, 404, 307]
        assert Histogram(server, "manifest", "3xx").count == 2
        assert Histogram(server, "other", "4xx").count == 1  # a malformed reference is answered here


async def test_a_request_queued_behind_a_held_check_is_observed_with_its_wait(tmp_path: Path) -> None:
    async with server_with_mirror(tmp_path, ARCHEIO_HEAD_TIMEOUT="30") as (server, mirror):
        mirror.present.add(digest(1))
        mirror.mode = GATE
        client = await AsyncClient.connect(port_of(server))
        # The manifest comes in the same read, behind the blob: it is answered after it.
        raw = request_bytes("GET", blob_path(digest(1)), xff(AWS_EU_WEST_3), close=False) + request_bytes(
            "GET", MANIFEST, close=False)
        sent = await hold_check(mirror, client, raw)
        statuses = [(await client.read_response()).status for _ in range(2)]
        waited = time.monotonic() - sent
        await client.close()
        assert statuses == [307, 307]
        manifest = Histogram(server, "manifest", "3xx")
        assert HELD <= manifest.sum <= waited
        assert manifest.holds_one_observation_of(manifest.sum), manifest.buckets


async def test_a_request_refused_by_the_http_layer_is_observed_as_kind_http(tmp_path: Path) -> None:
    async with server_with_mirror(tmp_path) as (server, _mirror):
        client = await AsyncClient.connect(port_of(server))
        await client.send(b"GET /v2/ HTTP/1.1\r\nHost: a\r\n\r\nNOT HTTP AT ALL\r\n\r\n")
        statuses = [(await client.read_response()).status for _ in range(2)]
        await client.close()
        assert statuses == [200, 400]
        await wait_until(lambda: Histogram(server, "http", "4xx").count == 1, "the refusal to be observed")
        assert Histogram(server, "other", "2xx").count == 1


def test_a_value_on_a_bound_is_counted_in_that_bound() -> None:
    latency = RequestLatency()
    key = ("manifest", "upstream", 307)
    bound = REQUEST_BUCKETS[3]
    latency.observe(key, bound)
    latency.observe(key, REQUEST_BUCKETS[-1] * 2)  # beyond the last bound: +Inf only
    [[kind, status_class, counts, seconds]] = latency.snapshot()
    assert (kind, status_class) == ("manifest", "3xx")
    assert counts[3] == 1 and counts[-1] == 1 and sum(counts) == 2
    assert seconds == pytest.approx(bound + REQUEST_BUCKETS[-1] * 2)
    assert latency.counts() == {key: 2}
