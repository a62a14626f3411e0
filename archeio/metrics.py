"""Prometheus metrics, from the plain counters the request path already keeps.

Why no metrics library on the hot path: `prometheus_client`'s
`.labels(...).inc()` costs a dictionary lookup, a lock and an object per
call, more than a whole cached redirect. The flow, the engines and the
existence cache only bump plain counters; this module turns them into the
Prometheus text format when somebody scrapes. It renders that format itself
(a few dozen lines), so neither a serving process nor the supervisor imports
a metrics library: start-up stays short and the supervisor small.

Each component hands its numbers to the process's `Exporter` as a named
part (a function returning plain data); the exporter knows nothing of
servers, engines or reloaders, only of those parts. A *snapshot* is all the
parts of one process at one moment, a JSON-able dict. With one process the
admin port renders the live snapshot; with several workers each worker
sends its snapshot to the supervisor once a second (workers.py) and the
supervisor renders all of them summed. One rendering path serves both, so
single- and multi-process metrics cannot drift apart.

Counters are summed over workers; per-worker facts that must not be summed
(range data, memory, CPU) carry a `worker` label.
"""

from __future__ import annotations

import datetime
import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

Snapshot = dict[str, Any]

# Upper bounds (seconds) of the existence-check latency histogram: a HEAD to
# a bucket in the same region takes a few ms, a cross-region one ~100 ms,
# and the default deadline is 1 s.
CHECK_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# The outcome of a check that shared another's HEAD: no HEAD of its own.
_COALESCED = "coalesced"

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class CheckLatency:
    """The histogram of existence HEAD durations, by outcome."""

    def __init__(self) -> None:
        # outcome -> counts per bucket (the last one is +Inf), and sum of seconds.
        self.buckets: dict[str, list[int]] = {}
        self.seconds: dict[str, float] = {}

    def on_check(self, mirror: str, outcome: str, seconds: float) -> None:
        """BlobExistenceCache's hook, once per check that needed the mirror."""
        if outcome == _COALESCED:
            return  # a shared wait, not a HEAD of its own
        buckets = self.buckets.get(outcome)
        if buckets is None:
            buckets = self.buckets[outcome] = [0] * (len(CHECK_BUCKETS) + 1)
        for i, bound in enumerate(CHECK_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
                break
        else:
            buckets[-1] += 1
        self.seconds[outcome] = self.seconds.get(outcome, 0.0) + seconds


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


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Exporter:
    """The snapshot of one process, assembled from the parts its components provide."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self._parts: dict[str, Callable[[], Any]] = {}

    def provide(self, name: str, part: Callable[[], Any]) -> None:
        """`part()` gives the current value of snapshot key `name` (plain data)."""
        self._parts[name] = part

    def snapshot(self) -> Snapshot:
        snap: Snapshot = {
            "worker": self.worker,
            "pid": os.getpid(),
            "time": time.time(),
            "rss_bytes": resident_bytes(),
            "cpu_seconds": time.process_time(),
        }
        for name, part in self._parts.items():
            snap[name] = part()
        return snap


# Parts of a snapshot that only count up; a retired (dead) worker keeps these.
_COUNTER_PARTS = (
    "requests", "blob_decisions", "checks", "check_buckets", "check_seconds", "reloads", "connections_closed",
    "rate_forgotten",
)


def retire(snap: Snapshot) -> Snapshot:
    """The counters of a worker that exited, kept so that sums never go down."""
    return {"worker": "retired", **{k: snap[k] for k in _COUNTER_PARTS if k in snap}}


class MetricsSource(Protocol):
    """What the admin port reads: one process's state, or a supervisor's view of all."""

    def snapshots(self) -> list[Snapshot]: ...

    def readiness(self) -> tuple[bool, str]: ...

    def worker_counts(self) -> dict[str, int]: ...


# -- the Prometheus text format (version 0.0.4) ------------------------------------


def _label_value(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value))


class Family:
    """One metric family: HELP, TYPE and its samples."""

    def __init__(self, name: str, kind: str, help: str, labels: tuple[str, ...] = ()) -> None:
        # Counters are exposed with the `_total` suffix, as client libraries do.
        self.name = name + "_total" if kind == "counter" else name
        self.kind = kind
        self.help = help
        self.labels = labels
        self.samples: list[tuple[str, tuple[tuple[str, object], ...], float]] = []

    def add(self, values: Iterable[object], value: float) -> None:
        self.samples.append((self.name, tuple(zip(self.labels, values, strict=True)), value))

    def add_histogram(self, values: Iterable[object], counts: list[int], total: float) -> None:
        """Cumulative buckets from per-bucket `counts` over CHECK_BUCKETS and +Inf."""
        labels = tuple(zip(self.labels, values, strict=True))
        running = 0
        for bound, count in zip((*CHECK_BUCKETS, float("inf")), counts, strict=True):
            running += count
            self.samples.append((self.name + "_bucket", (("le", _number(bound)), *labels), running))
        self.samples.append((self.name + "_count", labels, running))
        self.samples.append((self.name + "_sum", labels, total))

    def render(self) -> Iterator[str]:
        yield f"# HELP {self.name} {self.help.replace(chr(92), chr(92) * 2)}"
        yield f"# TYPE {self.name} {self.kind}"
        for name, labels, value in self.samples:
            if labels:
                inner = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels)
                yield f"{name}{{{inner}}} {_number(value)}"
            else:
                yield f"{name} {_number(value)}"


def render(source: MetricsSource) -> bytes:
    """The whole /metrics page for `source`."""
    lines = [line for family in collect(source) for line in family.render()]
    return ("\n".join(lines) + "\n").encode()


def _sum_rows(snaps: list[Snapshot], key: str) -> Counter[tuple[Any, ...]]:
    total: Counter[tuple[Any, ...]] = Counter()
    for snap in snaps:
        for *labels, count in snap.get(key, ()):
            total[tuple(labels)] += count
    return total


def _sum_maps(snaps: list[Snapshot], key: str) -> Counter[Any]:
    total: Counter[Any] = Counter()
    for snap in snaps:
        total.update(snap.get(key, {}))
    return total


def collect(source: MetricsSource) -> Iterator[Family]:
    """Every metric family, from the source's snapshots."""
    snaps = source.snapshots()
    live = [s for s in snaps if s.get("worker") != "retired"]
    yield from _requests(snaps, live)
    yield from _rate_limit(snaps, live)
    yield from _existence(snaps, live)
    yield from _ranges(snaps, live)
    yield from _processes(source, live)


def _requests(snaps: list[Snapshot], live: list[Snapshot]) -> Iterator[Family]:
    requests = Family(
        "archeio_requests", "counter", "Answers of the public port by route kind ('http': refused by "
        "the HTTP layer before routing), decision and status.",
        ("kind", "decision", "status"),
    )
    for (kind, decision, status), count in sorted(_sum_rows(snaps, "requests").items()):
        requests.add((kind, decision, status), count)
    yield requests
    blobs = Family(
        "archeio_blob_decisions", "counter", "Blob redirects by the client's cloud and region "
        "('none': in no provider's range) and where they went.",
        ("cloud", "region", "decision"),
    )
    for (cloud, region, decision), count in sorted(_sum_rows(snaps, "blob_decisions").items()):
        blobs.add((cloud or "none", region or "none", decision), count)
    yield blobs
    per_worker = Family("archeio_worker_requests", "counter", "Answers given by each worker process.", ("worker",))
    for snap in live:
        per_worker.add((snap["worker"],), sum(row[-1] for row in snap.get("requests", ())))
    yield per_worker
    gauges = _sum_maps(live, "connections")
    connections = Family(
        "archeio_connections", "gauge", "Open public connections by state: idle, reading (part of a "
        "request received, or none yet on a new connection), busy (holding accepted requests), lingering "
        "(closing: every answer handed over, our side shut, reading what the client still sends).",
        ("state",),
    )
    for state in ("idle", "reading", "busy", "lingering"):
        connections.add((state,), gauges[state])
    yield connections
    awaiting = Family(
        "archeio_requests_awaiting_check", "gauge", "Accepted blob requests waiting for an existence check."
    )
    awaiting.add((), gauges["awaiting_check"])
    yield awaiting
    closed = Family(
        "archeio_connections_closed", "counter", "Connections closed by the server's limits: "
        "limit_lingering, limit_idle, limit_slow (to make room), limit_refused (newcomer refused), "
        "header_timeout, keepalive_timeout, linger_timeout, linger_bytes (a lingering close cut short).",
        ("reason",),
    )
    for reason, count in sorted(_sum_maps(snaps, "connections_closed").items()):
        closed.add((reason,), count)
    yield closed


def _rate_limit(snaps: list[Snapshot], live: list[Snapshot]) -> Iterator[Family]:
    """The per-client limit's table (ARCHEIO_RATE_LIMIT; no samples when it is off)."""
    on = [snap for snap in live if "rate_clients" in snap]
    clients = Family(
        "archeio_rate_limit_clients", "gauge", "Clients whose rate-limit bucket is remembered, all workers "
        "(at most ARCHEIO_RATE_CLIENTS each).",
    )
    forgotten = Family(
        "archeio_rate_limit_forgotten", "counter", "Rate-limit buckets forgotten before they were full, "
        "to stay within ARCHEIO_RATE_CLIENTS (each such client starts again with a full bucket).",
    )
    if on:
        clients.add((), sum(snap["rate_clients"] for snap in on))
        forgotten.add((), sum(snap.get("rate_forgotten", 0) for snap in snaps))
    yield from (clients, forgotten)


def _existence(snaps: list[Snapshot], live: list[Snapshot]) -> Iterator[Family]:
    buckets: dict[str, list[int]] = {}
    for snap in snaps:
        for outcome, counts in snap.get("check_buckets", {}).items():
            into = buckets.setdefault(outcome, [0] * len(counts))
            for i, n in enumerate(counts):
                into[i] += n
    checks = Family(
        "archeio_existence_checks", "counter", "Existence answers that needed the mirror (or, with the "
        "signature fallback, the regional upstream), by outcome (hit, miss, error, timeout: a HEAD; "
        "coalesced: shared another's HEAD; over_capacity, breaker_open: none sent).",
        ("outcome",),
    )
    for outcome, count in sorted(_sum_maps(snaps, "checks").items()):
        checks.add((outcome,), count)
    yield checks
    latency = Family(
        "archeio_existence_check_seconds", "histogram", "Duration of existence HEADs to mirrors (and the "
        "regional upstream), by outcome.",
        ("outcome",),
    )
    seconds = _sum_maps(snaps, "check_seconds")
    for outcome, counts in sorted(buckets.items()):
        latency.add_histogram((outcome,), counts, seconds[outcome])
    yield latency
    sizes = Family(
        "archeio_existence_cache_entries", "gauge", "Entries in the existence caches, all workers.", ("cache",)
    )
    for cache, count in sorted(_sum_maps(live, "cache").items()):
        sizes.add((cache,), count)
    yield sizes
    breakers = Family(
        "archeio_mirror_breaker_state", "gauge", "Workers whose circuit breaker for the mirror (or the "
        "regional upstream, by its URL) is in the state (closed, open, half_open); each appears once checked.",
        ("mirror", "state"),
    )
    states: Counter[tuple[str, str]] = Counter()
    for snap in live:
        states.update(snap.get("breakers", {}).items())
    for (mirror, state), count in sorted(states.items()):
        breakers.add((mirror, state), count)
    yield breakers


def _ranges(snaps: list[Snapshot], live: list[Snapshot]) -> Iterator[Family]:
    now = time.time()
    prefixes = Family(
        "archeio_ranges_prefixes", "gauge", "Distinct prefixes in the loaded range data; 0 for an expected "
        "provider (Google Cloud, the mirror table's clouds) that has none.", ("cloud", "worker")
    )
    age = Family(
        "archeio_ranges_age_seconds", "gauge", "Seconds since the provider published the loaded "
        "range data (AWS createDate, Google creationTime; Azure carries no date).",
        ("cloud", "worker"),
    )
    loaded = Family(
        "archeio_ranges_loaded_timestamp_seconds", "gauge", "When the provider's range data was loaded.",
        ("cloud", "worker"),
    )
    for snap in live:
        for cloud, facts in sorted(snap.get("ranges", {}).items()):
            labels = (cloud, snap["worker"])
            prefixes.add(labels, facts["prefixes"])
            if facts.get("loaded") is not None:  # an expected provider that is absent has no data
                loaded.add(labels, facts["loaded"])
            if facts.get("published") is not None:
                age.add(labels, now - facts["published"])
    yield from (prefixes, age, loaded)
    reloads = Family(
        "archeio_ranges_reloads", "counter", "Range file reloads per provider by outcome (loaded, "
        "unchanged, refused_unparseable, refused_loss, refused_older, refused_missing), summed over workers.",
        ("cloud", "outcome"),
    )
    for (cloud, outcome), count in sorted(_sum_rows(snaps, "reloads").items()):
        reloads.add((cloud, outcome), count)
    yield reloads


def _processes(source: MetricsSource, live: list[Snapshot]) -> Iterator[Family]:
    ready, _ = source.readiness()
    up = Family("archeio_ready", "gauge", "1 when /readyz answers 200.")
    up.add((), int(ready))
    yield up
    counts = source.worker_counts()
    workers = Family("archeio_workers", "gauge", "Worker processes: configured, running, ready.", ("state",))
    for state in ("configured", "running", "ready"):
        workers.add((state,), counts[state])
    yield workers
    restarts = Family("archeio_worker_restarts", "counter", "Worker processes restarted after exiting unexpectedly.")
    restarts.add((), counts["restarts"])
    yield restarts
    memory = Family("archeio_worker_resident_memory_bytes", "gauge", "Resident memory of each worker.", ("worker",))
    cpu = Family("archeio_worker_cpu_seconds", "counter", "CPU time used by each worker.", ("worker",))
    for snap in live:
        memory.add((snap["worker"],), snap.get("rss_bytes", 0))
        cpu.add((snap["worker"],), snap.get("cpu_seconds", 0.0))
    yield from (memory, cpu)
