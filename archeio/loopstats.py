"""Where a latency tail comes from: event-loop lag and garbage-collection pauses.

A request waits whenever the loop is busy with something else: a burst of
answers for another connection, a once-a-second housekeeping turn, or a
garbage collection (which stops everything). Both are measured here, always
on, for the admin port's metrics:

- loop lag: a timer is asked to run every `INTERVAL` seconds; how late it
  runs is how long the loop was held by other work at that moment (a
  sample every 50 ms: 1,200 a minute, enough for a p99 of the lag, and a
  wake-up of an idle server costs about 0.12 ms of CPU on the machines
  measured, so 100 a second would cost an idle pod 1.2 % of a core);
- GC pauses: `gc.callbacks` time every collection, by generation.

Each is a histogram of fixed buckets (counts, a sum and a total). The
same timer does the process's other frequent chore (`also`: the fold of
the answers' latencies, metrics.RequestLatency); when the chore finds
nothing to do, the next tick is a second away, so an idle server wakes
once a second and a serving one 20 times. The lag is sampled while the
server serves, which is when it matters. `freeze_after_start` is the other half: the objects of start-up
(the range index, the settings, every module) are moved out of the
collector's reach once the server serves, so a full collection walks only
what the running server made.
"""

from __future__ import annotations

import asyncio
import gc
import time
from bisect import bisect_left
from collections.abc import Callable

# Seconds. A request's own service time is some microseconds: a lag of a
# millisecond already shows in a p99.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
INTERVAL = 0.05
# While the chore finds nothing to do (no answers since the last tick), the
# next tick waits this long instead: an idle server wakes once a second.
IDLE_INTERVAL = 1.0


class Histogram:
    """Counts per bucket (the last one: beyond the largest bound), their sum and their number."""

    __slots__ = ("counts", "sum", "count")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0

    def add(self, seconds: float) -> None:
        self.counts[bisect_left(BUCKETS, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def rows(self) -> list[object]:
        """[counts, sum, count]: plain data for a snapshot."""
        return [list(self.counts), self.sum, self.count]


class LoopStats:
    """Measures one event loop's lag and this process's GC pauses while started."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = INTERVAL,
                 also: Callable[[], object] | None = None, idle_interval: float = IDLE_INTERVAL) -> None:
        self.loop = loop
        self.interval = interval
        self.idle_interval = idle_interval
        self._also = also
        self.lag = Histogram()
        self.gc = {generation: Histogram() for generation in range(3)}
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._gc_started = 0.0

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        self._due = self.loop.time() + self.interval
        self._handle = self.loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        now = self.loop.time()
        self.lag.add(max(0.0, now - self._due))
        busy = self._also() if self._also is not None else True
        self._due = now + (self.interval if busy else self.idle_interval)
        self._handle = self.loop.call_at(self._due, self._tick)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc[info["generation"]].add(time.perf_counter() - self._gc_started)

    def snapshot(self) -> dict[str, object]:
        return {"lag": self.lag.rows(), "gc": {str(g): h.rows() for g, h in self.gc.items()}}


def freeze_after_start() -> None:
    """Move every object start-up made to the permanent generation, and collect as usual from now on.

    Start-up runs with the collector off (it would walk the index's and
    the modules' objects again and again while they are made); the
    process turns it on here, once it serves.
    """
    gc.freeze()
    gc.enable()
