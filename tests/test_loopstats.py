"""Event-loop lag and GC pauses (archeio/loopstats.py): measured, summed over workers, exported."""

from __future__ import annotations

import asyncio
import gc
import time

from prometheus_client.parser import text_string_to_metric_families

from archeio.loopstats import BUCKETS, LoopStats, freeze_after_start
from archeio.metrics import Snapshot, render

from .ops_support import SnapshotSource


async def test_a_loop_held_by_other_work_shows_as_lag_of_at_least_that_long() -> None:
    stats = LoopStats(asyncio.get_running_loop(), interval=0.005)
    stats.start()
    try:
        await asyncio.sleep(0.02)  # some ticks of a free loop
        time.sleep(0.06)  # the loop held: the timer due meanwhile cannot run before this returns
        await asyncio.sleep(0.02)
    finally:
        stats.stop()
    counts, seconds, ticks = stats.lag.rows()
    assert ticks == sum(counts) >= 3
    held = BUCKETS.index(0.05)  # the bucket (0.025, 0.05]: a lag of 0.055 s or more lies beyond it
    assert sum(counts[held + 1:]) >= 1 and seconds >= 0.05


def test_collections_are_timed_by_generation_while_started() -> None:
    stats = LoopStats(asyncio.new_event_loop())
    stats.start()
    try:
        gc.collect(1)
        gc.collect(2)
    finally:
        stats.stop()
        stats.loop.close()
    gc.collect(2)  # stopped: not counted
    assert stats.gc[1].count >= 1 and stats.gc[2].count == 1
    assert stats.gc[2].sum > 0


def test_freezing_after_start_keeps_the_collector_on_and_start_ups_objects_out_of_reach() -> None:
    gc.disable()
    made = [[] for _ in range(1000)]  # tracked containers, as start-up makes
    try:
        freeze_after_start()
        assert gc.isenabled() and gc.get_freeze_count() >= len(made)
    finally:
        gc.unfreeze()
        gc.enable()


def test_lag_and_pauses_of_every_worker_are_summed_into_histograms() -> None:
    def snap(worker: str, lag: int, gen2: int) -> Snapshot:
        counts = [0] * (len(BUCKETS) + 1)
        counts[0] = lag
        pauses = [0] * (len(BUCKETS) + 1)
        pauses[BUCKETS.index(0.05)] = gen2  # collections of 25-50 ms
        return {"worker": worker, "loop": {"lag": [counts, 0.0001 * lag, lag],
                                           "gc": {"2": [pauses, 0.04 * gen2, gen2]}}}

    body = render(SnapshotSource([snap("0", 100, 1), snap("1", 50, 2)])).decode()
    samples = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(body) for s in f.samples]

    def value(name: str, **labels: str) -> float:
        return sum(v for n, have, v in samples if n == name and all(have.get(k) == w for k, w in labels.items()))

    assert value("archeio_event_loop_lag_seconds_count") == 150
    assert value("archeio_event_loop_lag_seconds_bucket", le="0.0001") == 150
    assert value("archeio_gc_pause_seconds_count", generation="2") == 3
    assert value("archeio_gc_pause_seconds_bucket", generation="2", le="0.025") == 0
    assert value("archeio_gc_pause_seconds_bucket", generation="2", le="0.05") == 3


async def test_the_chore_given_runs_at_every_tick_while_it_has_work() -> None:
    ran: list[float] = []
    stats = LoopStats(asyncio.get_running_loop(), interval=0.005, also=lambda: ran.append(time.monotonic()) or 1)
    stats.start()
    try:
        await asyncio.sleep(0.05)
    finally:
        stats.stop()
    assert len(ran) == stats.lag.count >= 3


async def test_ticks_slow_down_while_the_chore_finds_nothing_to_do() -> None:
    work = [1, 1, 0, 0, 0]
    stats = LoopStats(asyncio.get_running_loop(), interval=0.005, idle_interval=10.0,
                      also=lambda: work.pop(0) if work else 0)
    stats.start()
    try:
        await asyncio.sleep(0.1)  # busy ticks 5 ms apart, then the first idle one waits 10 s
    finally:
        stats.stop()
    assert stats.lag.count == 3 and work == [0, 0]
