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

Counters and histograms are summed over workers; per-process facts that
must not be summed (range data, and the standard `process_*` metrics of
each worker and of the supervisor) carry a `worker` label.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from . import __version__

Snapshot = dict[str, Any]

# Upper bounds (seconds) of the existence-check latency histogram: a HEAD to
# a bucket in the same region takes a few ms, a cross-region one ~100 ms,
# and the default deadline is 1 s.
CHECK_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# Upper bounds (seconds) of the public port's answer latency histogram. A
# redirect decided from memory is handed over some microseconds after its
# bytes were read (tens under load); one that waits for an existence check
# takes a HEAD's time, a few ms to the head timeout (1 s by default), and
# shutdown's grace bounds the rest.
REQUEST_BUCKETS: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
# A latency row: a count per bucket of REQUEST_BUCKETS, the +Inf bucket, then the sum of seconds.
REQUEST_ROW = len(REQUEST_BUCKETS) + 2

# The outcome of a check that shared another's HEAD: no HEAD of its own.
_COALESCED = "coalesced"

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class CheckLatency:
    """The histogram of existence HEAD durations, by mirror and outcome."""

    def __init__(self) -> None:
        # (mirror, outcome) -> counts per bucket (the last but one is +Inf), then the sum of seconds.
        self.rows: dict[tuple[str, str], list[Any]] = {}

    def on_check(self, mirror: str, outcome: str, seconds: float) -> None:
        """BlobExistenceCache's hook, once per check that needed the mirror."""
        if outcome == _COALESCED:
            return  # a shared wait, not a HEAD of its own
        row = self.rows.get((mirror, outcome))
        if row is None:
            row = self.rows[mirror, outcome] = [0] * (len(CHECK_BUCKETS) + 2)
        row[bisect_left(CHECK_BUCKETS, seconds)] += 1  # the first bound >= seconds
        row[-1] += seconds

    def snapshot(self) -> list[list[Any]]:
        """[[mirror, outcome, [bucket counts..., +Inf], sum]]: JSON for the supervisor."""
        return [[mirror, outcome, row[:-1], row[-1]] for (mirror, outcome), row in self.rows.items()]


# A counting key of the public port's answers: (route kind, decision, status).
AnswerKey = tuple[str, str, int]


class RequestLatency:
    """The public port's answers, counted with their latencies, by counting key.

    This is the count behind `archeio_requests_total` as well as the
    histogram behind `archeio_request_duration_seconds`: an answer is
    counted when its latency is, once the engine has handed it to the
    transport. On the hot path that is one append: the flow names the
    answer's list (`answers(key)`, its `last_answer`), the engine appends
    the seconds the answer took (how they are measured is the engines' to
    say: docs/operations.md). `fold`, every 50 ms (server.py) and before every read,
    turns the lists into counts per bucket and sums: each list is sorted
    (floats compare cheaply in C) and cut at the bucket bounds, so the lists
    hold at most about 50 ms of answers, and a fold holds the loop briefly.
    """

    def __init__(self) -> None:
        # key -> latencies (seconds) appended since the last fold (lists are cleared, never replaced).
        self.pending: dict[AnswerKey, list[float]] = {}
        # Where an engine appends for an answer already counted: emptied, never counted.
        self.discard: list[float] = []
        # key -> REQUEST_ROW numbers: counts per bucket, +Inf, then the sum of seconds.
        self.rows: dict[AnswerKey, list[Any]] = {}

    def answers(self, key: AnswerKey) -> list[float]:
        """The list an answer with this key appends its latency to."""
        found = self.pending.get(key)
        if found is None:
            found = self.pending[key] = []
        return found

    def observe(self, key: AnswerKey, seconds: float) -> None:
        self.answers(key).append(seconds)

    def fold(self) -> int:
        """Count what was appended since the last fold; how many answers that was."""
        self.discard.clear()
        folded = 0
        for key, latencies in self.pending.items():
            if not latencies:
                continue
            folded += len(latencies)
            row = self.rows.get(key)
            if row is None:
                row = self.rows[key] = [0] * REQUEST_ROW
            latencies.sort()
            below = 0
            for i, bound in enumerate(REQUEST_BUCKETS):
                upto = bisect_right(latencies, bound)  # latencies <= bound
                row[i] += upto - below
                below = upto
            row[len(REQUEST_BUCKETS)] += len(latencies) - below
            row[-1] += sum(latencies)
            latencies.clear()
        return folded

    def counts(self) -> dict[AnswerKey, int]:
        """Answers counted so far, by key."""
        self.fold()
        return {key: sum(row[:-1]) for key, row in self.rows.items()}

    def snapshot(self) -> list[list[Any]]:
        """[[kind, status class, [bucket counts..., +Inf], sum]], summed by kind and class."""
        self.fold()
        summed: dict[tuple[str, str], list[Any]] = {}
        for (kind, _decision, status), row in self.rows.items():
            into = summed.get((kind, f"{status // 100}xx"))
            if into is None:
                into = summed[kind, f"{status // 100}xx"] = [0] * REQUEST_ROW
            for i, n in enumerate(row):
                into[i] += n
        return [[kind, status_class, row[:-1], row[-1]] for (kind, status_class), row in summed.items()]


def published_timestamp(serial: str) -> float | None:
    """When the provider published its file, from its serial; None if it has no date.

    AWS createDate is `2026-07-29-08-27-05`, Google creationTime
    `2026-07-29T07:05:53.849365` (both UTC); Azure's changeNumber is a
    plain counter and carries no date.
    """
    import datetime  # not at start-up: the first snapshot imports it

    for layout in ("%Y-%m-%d-%H-%M-%S", "%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S"):
        try:
            parsed = datetime.datetime.strptime(serial, layout)
        except ValueError:
            continue
        return parsed.replace(tzinfo=datetime.UTC).timestamp()
    return None


def _memory_bytes() -> tuple[int, int]:
    """(resident, virtual) bytes of this process."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            size, resident = statm.read().split()[:2]
        return int(resident) * _PAGE_SIZE, int(size) * _PAGE_SIZE
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 0


def _start_time() -> float:
    """When this process started (seconds since the epoch): /proc's boot time plus its start tick."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            # The fields after the command's closing parenthesis; starttime is the 22nd field.
            ticks = int(stat.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith(b"btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()  # without /proc: the moment this module was imported


_STARTED = _start_time()


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def process_facts() -> dict[str, float]:
    """The standard `process_*` figures of this process (the Prometheus client libraries' names)."""
    resident, virtual = _memory_bytes()
    return {
        "resident_memory_bytes": resident,
        "virtual_memory_bytes": virtual,
        "cpu_seconds": time.process_time(),
        "open_fds": _open_fds(),
        "max_fds": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "start_time_seconds": _STARTED,
    }


def build_info(engine: str) -> dict[str, str]:
    """The labels of `archeio_build_info`."""
    return {"version": __version__, "python": ".".join(map(str, sys.version_info[:3])), "engine": engine}


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
            "process": process_facts(),
        }
        for name, part in self._parts.items():
            snap[name] = part()
        return snap


# Parts of a snapshot that only count up; a retired (dead) worker keeps these.
_COUNTER_PARTS = (
    "requests", "latency", "blob_decisions", "checks", "check_latency", "reloads", "connections_closed",
    "rate_forgotten", "loop",
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

    def add_histogram(
        self, values: Iterable[object], counts: list[int], total: float, bounds: tuple[float, ...] = CHECK_BUCKETS,
    ) -> None:
        """Cumulative buckets from per-bucket `counts` over `bounds` and +Inf."""
        labels = tuple(zip(self.labels, values, strict=True))
        running = 0
        for bound, count in zip((*bounds, float("inf")), counts, strict=True):
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


def _sum_histograms(snaps: list[Snapshot], key: str) -> dict[tuple[Any, ...], tuple[list[int], float]]:
    """Rows of [*labels, bucket counts, sum] summed by their labels."""
    total: dict[tuple[Any, ...], tuple[list[int], float]] = {}
    for snap in snaps:
        for *labels, counts, seconds in snap.get(key, ()):
            before = total.get(tuple(labels))
            if before is None:
                total[tuple(labels)] = (list(counts), seconds)
            else:
                total[tuple(labels)] = ([a + b for a, b in zip(before[0], counts, strict=True)], before[1] + seconds)
    return total


def collect(source: MetricsSource) -> Iterator[Family]:
    """Every metric family, from the source's snapshots."""
    snaps = source.snapshots()
    live = [s for s in snaps if s.get("worker") != "retired"]
    yield from _requests(snaps, live)
    yield from _rate_limit(snaps, live)
    yield from _existence(snaps, live)
    yield from _ranges(snaps, live)
    yield from _loop(snaps)
    yield from _processes(source, live)


def _loop(snaps: list[Snapshot]) -> Iterator[Family]:
    """Event-loop lag and GC pauses (loopstats.py), every worker together: where a latency tail comes from."""
    from .loopstats import BUCKETS

    lag = Family(
        "archeio_event_loop_lag_seconds", "histogram", "How late a timer ran (every 50 ms while serving, "
        "every second when idle): the time the event loop was held by other work (answers of other "
        "connections, housekeeping, a collection).",
    )
    pauses = Family(
        "archeio_gc_pause_seconds", "histogram", "Garbage collections of the serving processes and their "
        "durations, by generation (the loop stops for each).", ("generation",),
    )
    lag_counts: list[int] | None = None
    lag_sum = 0.0
    gc_rows: dict[str, tuple[list[int], float]] = {}
    for snap in snaps:
        loop = snap.get("loop")
        if not loop:
            continue
        counts, seconds, _ = loop["lag"]
        lag_counts = list(counts) if lag_counts is None else [a + b for a, b in zip(lag_counts, counts, strict=True)]
        lag_sum += seconds
        for generation, (counts, seconds, _) in loop["gc"].items():
            before = gc_rows.get(generation)
            gc_rows[generation] = (list(counts), seconds) if before is None else (
                [a + b for a, b in zip(before[0], counts, strict=True)], before[1] + seconds)
    if lag_counts is not None:
        lag.add_histogram((), lag_counts, lag_sum, BUCKETS)
    for generation, (counts, seconds) in sorted(gc_rows.items()):
        pauses.add_histogram((generation,), counts, seconds, BUCKETS)
    yield from (lag, pauses)


def _requests(snaps: list[Snapshot], live: list[Snapshot]) -> Iterator[Family]:
    requests = Family(
        "archeio_requests", "counter", "Answers of the public port by route kind ('http': refused by "
        "the HTTP layer before routing), decision and status.",
        ("kind", "decision", "status"),
    )
    for (kind, decision, status), count in sorted(_sum_rows(snaps, "requests").items()):
        requests.add((kind, decision, status), count)
    yield requests
    latency = Family(
        "archeio_request_duration_seconds", "histogram", "Time from the start of the read that completed a "
        "request to its answer's hand-over to the transport, by route kind and status class.",
        ("kind", "status_class"),
    )
    for (kind, status_class), (counts, seconds) in sorted(_sum_histograms(snaps, "latency").items()):
        latency.add_histogram((kind, status_class), counts, seconds, REQUEST_BUCKETS)
    yield latency
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
        if "requests" in snap:  # a serving process (the supervisor's own snapshot has none)
            per_worker.add((snap["worker"],), sum(row[-1] for row in snap["requests"]))
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
    checks = Family(
        "archeio_existence_checks", "counter", "Existence answers that needed a HEAD, by mirror (its base "
        "URL, or with the signature fallback the regional upstream's) and outcome (hit; miss: 404; forbidden: "
        "403, taken as not there like a miss; error, timeout: a HEAD that failed; coalesced: shared another's "
        "HEAD; over_capacity, breaker_open: none sent).",
        ("mirror", "outcome"),
    )
    for (mirror, outcome), count in sorted(_sum_rows(snaps, "checks").items()):
        checks.add((mirror, outcome), count)
    yield checks
    latency = Family(
        "archeio_existence_check_seconds", "histogram", "Duration of existence HEADs to mirrors (and the "
        "regional upstream), by mirror and outcome.",
        ("mirror", "outcome"),
    )
    for (mirror, outcome), (counts, seconds) in sorted(_sum_histograms(snaps, "check_latency").items()):
        latency.add_histogram((mirror, outcome), counts, seconds)
    yield latency
    sizes = Family(
        "archeio_existence_cache_entries", "gauge", "Entries in the existence caches, all workers, by "
        "mirror and cache (hits; misses: misses and failed checks).",
        ("mirror", "cache"),
    )
    for (mirror, cache), count in sorted(_sum_rows(live, "cache").items()):
        sizes.add((mirror, cache), count)
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
    builds = Family("archeio_build_info", "gauge", "The running version, Python and HTTP engine (value 1).",
                    ("version", "python", "engine"))
    for version, python, engine in sorted({
        (b["version"], b["python"], b["engine"]) for b in (snap.get("build") for snap in live) if b
    }):
        builds.add((version, python, engine), 1)
    yield builds
    yield from _process_families(live)


# The standard process metrics, as Prometheus client libraries name them:
# (snapshot key, metric, type, help).
_PROCESS = (
    ("cpu_seconds", "process_cpu_seconds", "counter", "CPU time the process has used, user and system, in seconds."),
    ("resident_memory_bytes", "process_resident_memory_bytes", "gauge", "The process's resident memory in bytes."),
    ("virtual_memory_bytes", "process_virtual_memory_bytes", "gauge", "The process's virtual memory in bytes."),
    ("open_fds", "process_open_fds", "gauge", "File descriptors the process holds open."),
    ("max_fds", "process_max_fds", "gauge", "The most file descriptors the process may open (its soft limit)."),
    ("start_time_seconds", "process_start_time_seconds", "gauge",
     "When the process started, in seconds since the Unix epoch."),
)


def _process_families(live: list[Snapshot]) -> Iterator[Family]:
    """One series per process: each worker, and the supervisor (`worker="supervisor"`) if there is one."""
    for key, name, kind, text in _PROCESS:
        family = Family(name, kind, text, ("worker",))
        for snap in live:
            facts = snap.get("process")
            if facts:
                family.add((snap["worker"],), facts[key])
        yield family
