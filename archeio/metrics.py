"""Prometheus metrics, read from the plain counters the request path already keeps.

Why not prometheus-client counters on the hot path: `.labels(...).inc()`
costs a dictionary lookup, a lock and an object per call, more than a whole
cached redirect. The request path only bumps `collections.Counter`s
(`Frontend.requests`, `Frontend.blob_decisions`, `BlobExistenceCache.outcomes`);
this module turns them into metric families when Prometheus scrapes.

Everything a process knows is first flattened into a *snapshot*, a plain
JSON-able dict. With one process the admin port renders the live snapshot;
with several workers each worker writes its snapshot to a file once a
second (atomic rename) and the supervisor's admin port renders all of them
summed (see workers.py). One rendering path serves both, so single- and
multi-process metrics cannot drift apart.

Counters are summed over workers; per-worker facts that must not be summed
(range data, memory, CPU) carry a `worker` label.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .existence import COALESCED

if TYPE_CHECKING:
    from .server import Server

Snapshot = dict[str, Any]

# Upper bounds (seconds) of the existence-check latency histogram: a HEAD to
# a bucket in the same region takes a few ms, a cross-region one ~100 ms,
# and the default deadline is 1 s.
CHECK_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class WorkerStats:
    """Per-process numbers that have no home in the request path's objects."""

    def __init__(self) -> None:
        # outcome -> counts per bucket (the last one is +Inf), and sum of seconds.
        self.check_buckets: dict[str, list[int]] = {}
        self.check_seconds: dict[str, float] = {}
        # (cloud, reload outcome) -> count; see reload.py.
        self.reloads: Counter[tuple[str, str]] = Counter()

    def on_check(self, mirror: str, outcome: str, seconds: float) -> None:
        """BlobExistenceCache's hook, once per HEAD (not per cached answer)."""
        if outcome == COALESCED:
            return  # a shared wait, not a HEAD of its own
        buckets = self.check_buckets.get(outcome)
        if buckets is None:
            buckets = self.check_buckets[outcome] = [0] * (len(CHECK_BUCKETS) + 1)
        for i, bound in enumerate(CHECK_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
                break
        else:
            buckets[-1] += 1
        self.check_seconds[outcome] = self.check_seconds.get(outcome, 0.0) + seconds


def published_timestamp(serial: str) -> float | None:
    """When the provider published its file, from its serial; None if it has no date.

    AWS createDate is `2026-07-29-08-27-05`, Google creationTime
    `2026-07-29T07:05:53.849365` (both UTC); Azure's changeNumber is a
    plain counter and carries no date.
    """
    for layout in ("%Y-%m-%d-%H-%M-%S", "%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S"):
        try:
            parsed = datetime.datetime.strptime(serial, layout)
        except ValueError:
            continue
        return parsed.replace(tzinfo=datetime.UTC).timestamp()
    return None


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def snapshot(server: Server, worker: str) -> Snapshot:
    """Everything the metrics need from one serving process, as plain data."""
    frontend, connections = server.frontend, server.connections
    snap: Snapshot = {
        "worker": worker,
        "pid": os.getpid(),
        "time": time.time(),
        "ready": server.ready,
        "reloads": [[c, o, n] for (c, o), n in server.stats.reloads.items()],
        "check_buckets": server.stats.check_buckets,
        "check_seconds": dict(server.stats.check_seconds),
        "rss_bytes": _resident_bytes(),
        "cpu_seconds": time.process_time(),
    }
    if frontend is None or connections is None:
        return snap
    cache = frontend.cache
    index = frontend.index
    loaded_at = server.reloader.loaded_at if server.reloader is not None else {}
    snap.update({
        "requests": [[k, b, s, n] for (k, b, s), n in frontend.requests.items()],
        "blob_decisions": [[c, r, b, n] for (c, r, b), n in frontend.blob_decisions.items()],
        "checks": dict(cache.outcomes),
        "cache": cache.sizes,
        "breakers": {mirror: breaker.state for mirror, breaker in cache.breakers.items()},
        "in_flight": connections.busy(),
        "ranges": {
            cloud: {
                "prefixes": index.prefix_counts.get(cloud, 0),
                "serial": provider.serial,
                "published": published_timestamp(provider.serial),
                "loaded": loaded_at.get(cloud, frontend.index_loaded_at),
            }
            for cloud, provider in index.providers.items()
        },
    })
    return snap


# Parts of a snapshot that only count up; a retired (dead) worker keeps these.
_COUNTER_PARTS = ("requests", "blob_decisions", "checks", "check_buckets", "check_seconds", "reloads")


def retire(snap: Snapshot) -> Snapshot:
    """The counters of a worker that exited, kept so that sums never go down."""
    return {"worker": "retired", **{k: snap[k] for k in _COUNTER_PARTS if k in snap}}


def write_snapshot(path: Path, snap: Snapshot) -> None:
    """Replace `path` atomically, so the supervisor never reads half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(snap))
    os.replace(tmp, path)


def read_snapshot(path: Path) -> Snapshot | None:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


class MetricsSource(Protocol):
    """What the admin port reads: one process's state, or a supervisor's view of all."""

    def snapshots(self) -> list[Snapshot]: ...

    def readiness(self) -> tuple[bool, str]: ...

    def worker_counts(self) -> dict[str, int]: ...


class ServerSource:
    """A single serving process reporting on itself."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def snapshots(self) -> list[Snapshot]:
        return [snapshot(self.server, "0")]

    def readiness(self) -> tuple[bool, str]:
        return self.server.readiness()

    def worker_counts(self) -> dict[str, int]:
        return {"configured": 1, "running": 1, "ready": int(self.server.ready), "restarts": 0}


def _sum_rows(snaps: list[Snapshot], key: str) -> Counter[tuple[Any, ...]]:
    total: Counter[tuple[Any, ...]] = Counter()
    for snap in snaps:
        for *labels, count in snap.get(key, ()):
            total[tuple(labels)] += count
    return total


class ArcheioCollector(Collector):
    """Renders the snapshots of a `MetricsSource` as Prometheus metric families."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        snaps = self.source.snapshots()
        live = [s for s in snaps if s.get("worker") != "retired"]
        yield from self._requests(snaps, live)
        yield from self._existence(snaps, live)
        yield from self._ranges(snaps, live)
        yield from self._processes(live)

    def _requests(self, snaps: list[Snapshot], live: list[Snapshot]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "archeio_requests", "Requests on the public port by route kind, decision and status.",
            labels=("kind", "decision", "status"),
        )
        for (kind, decision, status), count in sorted(_sum_rows(snaps, "requests").items()):
            requests.add_metric((kind, decision, str(status)), count)
        yield requests
        blobs = CounterMetricFamily(
            "archeio_blob_decisions", "Blob redirects by the client's cloud and region "
            "('none': in no provider's range) and where they went.",
            labels=("cloud", "region", "decision"),
        )
        for (cloud, region, decision), count in sorted(_sum_rows(snaps, "blob_decisions").items()):
            blobs.add_metric((cloud or "none", region or "none", decision), count)
        yield blobs
        per_worker = CounterMetricFamily(
            "archeio_worker_requests", "Requests answered by each worker process.", labels=("worker",),
        )
        for snap in live:
            per_worker.add_metric((snap["worker"],), sum(row[-1] for row in snap.get("requests", ())))
        yield per_worker
        in_flight = GaugeMetricFamily(
            "archeio_in_flight_requests", "Requests received and not yet answered."
        )
        in_flight.add_metric((), sum(s.get("in_flight", 0) for s in live))
        yield in_flight

    def _existence(self, snaps: list[Snapshot], live: list[Snapshot]) -> Iterator[Metric]:
        outcomes: Counter[str] = Counter()
        buckets: dict[str, list[int]] = {}
        seconds: Counter[str] = Counter()
        for snap in snaps:
            outcomes.update(snap.get("checks", {}))
            seconds.update(snap.get("check_seconds", {}))
            for outcome, counts in snap.get("check_buckets", {}).items():
                into = buckets.setdefault(outcome, [0] * len(counts))
                for i, n in enumerate(counts):
                    into[i] += n
        checks = CounterMetricFamily(
            "archeio_existence_checks", "Blob existence answers that needed the mirror, by outcome "
            "(hit, miss, error, timeout: a HEAD; coalesced: shared another's HEAD; "
            "over_capacity, breaker_open: none sent).",
            labels=("outcome",),
        )
        for outcome, count in sorted(outcomes.items()):
            checks.add_metric((outcome,), count)
        yield checks
        latency = HistogramMetricFamily(
            "archeio_existence_check_seconds", "Duration of existence HEADs to mirrors, by outcome.",
            labels=("outcome",),
        )
        for outcome, counts in sorted(buckets.items()):
            cumulative, running = [], 0
            for bound, n in zip((*CHECK_BUCKETS, float("inf")), counts, strict=True):
                running += n
                cumulative.append(("+Inf" if bound == float("inf") else str(bound), running))
            latency.add_metric((outcome,), cumulative, sum_value=seconds[outcome])
        yield latency
        sizes = GaugeMetricFamily(
            "archeio_existence_cache_entries", "Entries in the existence caches, all workers.",
            labels=("cache",),
        )
        size_totals: Counter[str] = Counter()
        for snap in live:
            size_totals.update(snap.get("cache", {}))
        for cache, count in sorted(size_totals.items()):
            sizes.add_metric((cache,), count)
        yield sizes
        breakers = GaugeMetricFamily(
            "archeio_mirror_breaker_state", "Workers whose circuit breaker for the mirror is in "
            "the state (closed, open, half_open); mirrors appear once checked.",
            labels=("mirror", "state"),
        )
        states: Counter[tuple[str, str]] = Counter()
        for snap in live:
            states.update(snap.get("breakers", {}).items())
        for (mirror, state), count in sorted(states.items()):
            breakers.add_metric((mirror, state), count)
        yield breakers

    def _ranges(self, snaps: list[Snapshot], live: list[Snapshot]) -> Iterator[Metric]:
        now = time.time()
        prefixes = GaugeMetricFamily(
            "archeio_ranges_prefixes", "Distinct prefixes in the loaded range data.",
            labels=("cloud", "worker"),
        )
        age = GaugeMetricFamily(
            "archeio_ranges_age_seconds", "Seconds since the provider published the loaded "
            "range data (AWS createDate, Google creationTime; Azure carries no date).",
            labels=("cloud", "worker"),
        )
        loaded = GaugeMetricFamily(
            "archeio_ranges_loaded_timestamp_seconds", "When the provider's range data was loaded.",
            labels=("cloud", "worker"),
        )
        for snap in live:
            for cloud, facts in sorted(snap.get("ranges", {}).items()):
                labels = (cloud, snap["worker"])
                prefixes.add_metric(labels, facts["prefixes"])
                loaded.add_metric(labels, facts["loaded"])
                if facts.get("published") is not None:
                    age.add_metric(labels, now - facts["published"])
        yield from (prefixes, age, loaded)
        reloads = CounterMetricFamily(
            "archeio_ranges_reloads", "Range file reloads per provider by outcome (loaded, unchanged, "
            "refused_unparseable, refused_loss, refused_older, refused_missing), summed over workers.",
            labels=("cloud", "outcome"),
        )
        for (cloud, outcome), count in sorted(_sum_rows(snaps, "reloads").items()):
            reloads.add_metric((cloud, outcome), count)
        yield reloads

    def _processes(self, live: list[Snapshot]) -> Iterator[Metric]:
        ready, _ = self.source.readiness()
        up = GaugeMetricFamily("archeio_ready", "1 when /readyz answers 200.")
        up.add_metric((), int(ready))
        yield up
        counts = self.source.worker_counts()
        workers = GaugeMetricFamily(
            "archeio_workers", "Worker processes: configured, running, ready.", labels=("state",)
        )
        for state in ("configured", "running", "ready"):
            workers.add_metric((state,), counts[state])
        yield workers
        restarts = CounterMetricFamily(
            "archeio_worker_restarts", "Worker processes restarted after exiting unexpectedly."
        )
        restarts.add_metric((), counts["restarts"])
        yield restarts
        memory = GaugeMetricFamily(
            "archeio_worker_resident_memory_bytes", "Resident memory of each worker.", labels=("worker",)
        )
        cpu = CounterMetricFamily(
            "archeio_worker_cpu_seconds", "CPU time used by each worker.", labels=("worker",)
        )
        for snap in live:
            memory.add_metric((snap["worker"],), snap.get("rss_bytes", 0))
            cpu.add_metric((snap["worker"],), snap.get("cpu_seconds", 0.0))
        yield from (memory, cpu)
