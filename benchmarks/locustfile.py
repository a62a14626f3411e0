"""Realistic registry traffic for Locust: image pulls from clients all over the clouds, or a recorded log.

Two kinds of simulated client, picked by `BENCH_REPLAY`:

- `PullingClient` (the default) pulls one image after another, as
  container runtimes do: `GET /v2/`, then either containerd's way (`HEAD`
  the tag, `GET` the index by digest) or docker's (`GET` the tag), then the
  platform manifest by digest, the config blob and every layer blob. The
  mix (catalog, popularity, client places, missing blobs) is
  traffic_mix.py's.
- `ReplayingClient` (`BENCH_REPLAY=<file>`) sends the requests of a
  recorded access log (access_replay.py: archeio's JSON access lines, or a
  plain `[TIME] METHOD TARGET ADDRESS` list) at their recorded arrival
  times divided by `BENCH_REPLAY_SPEEDUP`, each from its recorded client
  address as `X-Forwarded-For: <address>, 127.0.0.1`.

Every answer is checked: the status, and for redirects the exact
`Location` traffic_mix.py expects from the server's settings. A wrong
redirect is a failure in Locust's statistics, not merely a slow request.
A replayed request the model cannot predict (a path outside the OCI
grammar, a query) must get the status the log recorded (or, without one,
no 5xx), and a redirect only to a configured host.

Exact percentiles, also in Locust's distributed mode. Locust's own
percentiles are rounded; this file keeps every response time of the
measured window (after `BENCH_WARMUP`). With `--processes N` or
`--master`/`--worker`, each worker sends its raw samples to the master
with its regular reports (`report_to_master`) and the rest with its
failure counts in a final `bench_final` message when it stops; the master
asks every worker to stop and send it (`bench_stop`) before it computes
one summary over all the samples of all the workers. Only the master (or
a single local process) writes `BENCH_SUMMARY_FILE`. Percentiles are
nearest-rank: the sample at index `min(n - 1, floor(p / 100 * n))` of the
sorted samples.

Knobs (environment variables, so other scripts can reuse this file):

| variable | default | meaning |
| --- | --- | --- |
| BENCH_USER_RATE | 50 | requests/s each pulling client sends (constant-throughput pacing); 0: no pacing |
| BENCH_SEED | 1 | catalog and client seed |
| BENCH_IMAGES | 60 | images in the catalog |
| BENCH_MISSING_SHARE | 0.05 | share of blobs the mirrors lack (the stand-in bucket must use the same) |
| BENCH_HEAD_FIRST | 0.5 | share of pulls that HEAD the tag first (containerd) |
| BENCH_CLIENTS | AWS=0.6,GCP=0.2,Azure=0.05,unknown=0.15 | client mix by cloud |
| BENCH_IPV6_SHARE | 0.1 | share of cloud clients with an IPv6 address |
| BENCH_CHECK | 1 | 0: do not check answers (for a baseline server such as a fixed-307 nginx) |
| BENCH_WARMUP | 0 | seconds after the start left out of the summary |
| BENCH_SUMMARY_FILE | (none) | write exact latency percentiles and rates of the run here (JSON; `-`: print) |
| BENCH_SAMPLES_DIR | (none) | every load-generating process also writes its raw samples there (to check the merge) |
| BENCH_REPLAY | (none) | replay this access log instead of simulating pulls |
| BENCH_REPLAY_SPEEDUP | 1 | replay this many times faster than recorded |
| BENCH_REPLAY_RATE | (none) | requests/s for a plain list without times |
| BENCH_REPLAY_LEAD | 1 | seconds between the master's start signal and the first replayed request |
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gevent
from locust import FastHttpUser, constant, constant_throughput, events, task
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from access_replay import Entry, Scheduled, parse_log, partition, schedule  # noqa: E402
from traffic_mix import TRUSTED_PROXY, Client, Expectations, Step, Traffic, env_value  # noqa: E402

# -- the traffic ------------------------------------------------------------

_traffic: Traffic | None = None


def traffic() -> Traffic:
    global _traffic
    if _traffic is None:
        _traffic = Traffic()
    return _traffic


# -- exact percentiles, merged over processes -----------------------------------

PERCENTILES = {"p50_ms": 50, "p95_ms": 95, "p99_ms": 99, "p999_ms": 99.9}


def nearest_rank(ordered: list[float], p: float) -> float | None:
    """The p-th percentile of sorted samples, nearest-rank (see the module docstring)."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _process_cpu() -> float:
    times = os.times()
    return times.user + times.system


class Recorder:
    """This process's samples over the measured window (after BENCH_WARMUP)."""

    def __init__(self) -> None:
        self.warmup = float(env_value("BENCH_WARMUP", "0"))
        self.reset()

    def reset(self) -> None:
        self.started = time.monotonic()
        self.window_start = 0.0
        self.last_sample = 0.0
        self.cpu_start = 0.0
        self.latencies: list[float] = []
        self.lateness: list[float] = []
        self.failures = 0
        self.failure_examples: Counter[str] = Counter()
        self.cpu_warnings = 0
        self._shipped = {"latencies": 0, "lateness": 0}

    def on_request(self, response_time: float, exception: BaseException | None) -> None:
        now = time.monotonic()
        if now - self.started < self.warmup:
            return
        if not self.window_start:
            self.window_start = now
            self.cpu_start = _process_cpu()
        self.last_sample = now
        self.latencies.append(response_time)
        if exception is not None:
            self.failures += 1
            if len(self.failure_examples) < 20:
                self.failure_examples[str(exception)[:1000]] += 1

    def on_lateness(self, seconds: float) -> None:
        """How late a replayed request left against its schedule."""
        if time.monotonic() - self.started >= self.warmup:
            self.lateness.append(round(seconds * 1000, 3))

    def unshipped(self) -> dict[str, list[float]]:
        """The samples not yet sent to the master, marked as sent."""
        batch: dict[str, list[float]] = {}
        for name in self._shipped:
            series: list[float] = getattr(self, name)
            batch[name] = series[self._shipped[name]:]
            self._shipped[name] = len(series)
        return batch

    def totals(self) -> dict[str, Any]:
        """What is counted rather than sampled, for this process."""
        now = time.monotonic()
        return {
            "pid": os.getpid(),
            "requests": len(self.latencies),
            "failures": self.failures,
            "failure_examples": dict(self.failure_examples),
            "window_seconds": self.last_sample - self.window_start if self.window_start else 0.0,
            "cpu_share": ((_process_cpu() - self.cpu_start) / (now - self.window_start)
                          if self.window_start and now > self.window_start else None),
            "cpu_warnings": self.cpu_warnings,
        }


def summarise(latencies: list[float], lateness: list[float], processes: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary over every sample of every process."""
    ordered = sorted(latencies)
    late = sorted(lateness)
    examples: Counter[str] = Counter()
    for process in processes:
        examples.update(process["failure_examples"])
    shares = [p["cpu_share"] for p in processes if p["cpu_share"] is not None]
    # Each process measured its own window; rates add up.
    achieved = sum(p["requests"] / p["window_seconds"] for p in processes if p["window_seconds"])
    result: dict[str, Any] = {
        "processes": len(processes),
        "window_seconds": round(max((p["window_seconds"] for p in processes), default=0.0), 2),
        "requests": len(ordered),
        "failures": sum(p["failures"] for p in processes),
        "achieved_rps": round(achieved, 1),
        **{key: None if (v := nearest_rank(ordered, p)) is None else round(v, 3) for key, p in PERCENTILES.items()},
        "max_ms": round(ordered[-1], 3) if ordered else None,
        # The busiest process says whether the generator kept up; the sum is what it cost.
        "generator_cpu_share": round(max(shares), 3) if shares else None,
        "generator_cpu_cores": round(sum(shares), 3) if shares else None,
        "generator_cpu_warnings": sum(p["cpu_warnings"] for p in processes),
        "failure_examples": dict(examples.most_common(20)),
        "per_process": [{k: v for k, v in p.items() if k != "failure_examples"} for p in processes],
    }
    if late:
        result["lateness_ms"] = {"p50": nearest_rank(late, 50), "p99": nearest_rank(late, 99), "max": late[-1],
                                 "share_over_10ms": round(sum(1 for x in late if x > 10) / len(late), 4)}
    return result


class Merger:
    """On the master: every worker's samples and totals, until each has sent its final part."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.latencies: dict[str, list[float]] = {}
        self.lateness: dict[str, list[float]] = {}
        self.totals: dict[str, dict[str, Any]] = {}
        self.started: set[str] = set()

    def add(self, worker: str, batch: dict[str, list[float]]) -> None:
        self.latencies.setdefault(worker, []).extend(batch.get("latencies", ()))
        self.lateness.setdefault(worker, []).extend(batch.get("lateness", ()))

    def missing(self) -> set[str]:
        return self.started - set(self.totals)

    def summary(self) -> dict[str, Any]:
        workers = sorted(self.totals)
        result = summarise([x for w in workers for x in self.latencies.get(w, [])],
                           [x for w in workers for x in self.lateness.get(w, [])],
                           [self.totals[w] for w in workers])
        result["workers_missing"] = sorted(self.missing())
        return result


recorder = Recorder()
merger = Merger()
# How long the master waits for the workers' final parts once it stops.
FINAL_WAIT_SECONDS = 60.0


def _write_summary(result: dict[str, Any]) -> None:
    path = os.environ.get("BENCH_SUMMARY_FILE")
    if path == "-":
        print("BENCH_SUMMARY " + json.dumps(result), flush=True)
    elif path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def _write_samples() -> None:
    directory = os.environ.get("BENCH_SAMPLES_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        Path(directory, f"samples-{os.getpid()}.json").write_text(
            json.dumps({"latencies": recorder.latencies, "lateness": recorder.lateness}))


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        runner.register_message("bench_started", lambda msg, **_: merger.started.add(msg.node_id))

        def on_final(msg: Any, **_: Any) -> None:
            merger.add(msg.node_id, msg.data["samples"])
            merger.totals[msg.node_id] = msg.data["totals"]

        runner.register_message("bench_final", on_final)
    elif isinstance(runner, WorkerRunner):
        # concurrent: stopping the users must not block the worker's message loop.
        runner.register_message("bench_stop", lambda environment, **_: environment.runner.stop(), concurrent=True)
        runner.register_message("bench_replay_plan", lambda msg, **_: replay_queue().assign(**msg.data))


@events.report_to_master.add_listener
def _on_report_to_master(data: dict[str, Any], **_: Any) -> None:
    data["bench_samples"] = recorder.unshipped()


@events.worker_report.add_listener
def _on_worker_report(client_id: str, data: dict[str, Any], **_: Any) -> None:
    if "bench_samples" in data:
        merger.add(client_id, data["bench_samples"])


@events.test_start.add_listener
def _on_test_start(environment: Any, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        merger.reset()
        if REPLAY_FILE:
            _send_replay_plans(runner)
        return
    if REPLAY_FILE:
        replay_queue()  # read the log before the first user runs
        if not isinstance(runner, WorkerRunner):
            replay_queue().assign(index=0, count=1, start_at=time.time() + REPLAY_LEAD)
    else:
        traffic()  # build the catalog and clients before the first user runs
    recorder.reset()
    if isinstance(runner, WorkerRunner):
        runner.send_message("bench_started")


@events.request.add_listener
def _on_request(response_time: float, exception: BaseException | None = None, **_: Any) -> None:
    recorder.on_request(response_time, exception)


@events.cpu_warning.add_listener
def _on_cpu_warning(**_: Any) -> None:
    recorder.cpu_warnings += 1


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        # Headless runs quit without stopping the workers first: ask them,
        # and wait for every final part while the message loop still runs.
        for worker in merger.missing():
            runner.send_message("bench_stop", None, worker)
        deadline = time.monotonic() + FINAL_WAIT_SECONDS
        while merger.missing() and time.monotonic() < deadline:
            gevent.sleep(0.05)
        _write_summary(merger.summary())
        return
    _write_samples()
    if isinstance(runner, WorkerRunner):
        runner.send_message("bench_final", {"samples": recorder.unshipped(), "totals": recorder.totals()})
    else:
        _write_summary(summarise(recorder.latencies, recorder.lateness, [recorder.totals()]))


# -- checking answers ----------------------------------------------------------

# 0 only to measure the generator against a baseline that answers everything alike.
CHECK_ANSWERS = env_value("BENCH_CHECK", "1") != "0"


def wrong_answer(step: Step, status: int, location: str | None, forwarded: str) -> str | None:
    """Why this answer is not the expected one, or None when it is."""
    if status != step.status or location != step.location:
        return (f"{step.method} {step.path} from {forwarded}: got {status} {location!r}, "
                f"expected {step.status} {step.location!r}")
    return None


def check(response: Any, problem: str | None) -> None:
    if problem is None or not CHECK_ANSWERS:
        response.success()
    else:
        response.failure(problem)


# -- simulated pulls ------------------------------------------------------------

USER_RATE = float(env_value("BENCH_USER_RATE", "50"))
REPLAY_FILE = os.environ.get("BENCH_REPLAY", "")


class PullingClient(FastHttpUser):
    """A node pulling images: one request per task, paced, in pull order."""

    abstract = bool(REPLAY_FILE)
    wait_time = constant_throughput(USER_RATE) if USER_RATE > 0 else constant(0)

    def on_start(self) -> None:
        self.rng = random.Random()
        if USER_RATE > 0:
            # Users spawn together; left in phase, they would all send at the
            # same instant every period and measure their own burst. A random
            # phase spreads the offered rate evenly over the period.
            gevent.sleep(self.rng.uniform(0, 1 / USER_RATE))
        self.steps: list[Step] = []
        self.headers: dict[str, str] = {}

    @task
    def next_request(self) -> None:
        if not self.steps:
            client, self.steps = traffic().next_pull(self.rng)
            self.steps.reverse()
            self.headers = {"X-Forwarded-For": client.forwarded}
        step = self.steps.pop()
        forwarded = self.headers["X-Forwarded-For"]
        with self.client.request(step.method, step.path, name=step.name, headers=self.headers,
                                 allow_redirects=False, catch_response=True) as response:
            problem = wrong_answer(step, response.status_code, response.headers.get("Location"), forwarded)
            if problem is None and step.status == 200 and \
                    response.headers.get("Docker-Distribution-Api-Version") != "registry/2.0":
                problem = "GET /v2/ without Docker-Distribution-Api-Version: registry/2.0"
            check(response, problem)


# -- replayed logs ----------------------------------------------------------------

REPLAY_LEAD = float(env_value("BENCH_REPLAY_LEAD", "1"))


class ReplayQueue:
    """This process's share of the recorded requests, in order, and when each is due."""

    def __init__(self, path: str) -> None:
        with open(path) as lines:
            entries, self.skipped = parse_log(lines)
        rate = os.environ.get("BENCH_REPLAY_RATE")
        self.plan = schedule(entries, float(env_value("BENCH_REPLAY_SPEEDUP", "1")), float(rate) if rate else None)
        self.expect = Expectations(dict(os.environ))
        self.clients: dict[str, Client | None] = {}
        self.allowed_hosts = self._configured_hosts()
        self.pending: deque[Scheduled] = deque()
        self.base: float | None = None  # time.monotonic() of offset 0

    def _configured_hosts(self) -> set[str]:
        """Every host a redirect may name under the server's settings (and its fixed pages)."""
        urls = [self.expect.upstream, self.expect.default_mirror, self.expect.signature_endpoint,
                "https://github.com/", "https://www.linuxfoundation.org/"]
        urls += [url for regions in self.expect.mirrors.by_cloud.values() for url in regions.values()]
        return {urlsplit(url).netloc for url in urls if url}

    def assign(self, index: int, count: int, start_at: float) -> None:
        """Take part `index` of `count`; offset 0 is at wall-clock `start_at` (the master's clock)."""
        self.pending = deque(partition(self.plan, index, count))
        self.base = time.monotonic() + (start_at - time.time())

    def client(self, address: str | None) -> Client | None:
        if address is None:
            return None
        if address not in self.clients:
            self.clients[address] = self.expect.client(address)
        return self.clients[address]

    def expected(self, entry: Entry) -> tuple[str, Step | None]:
        """The statistics name of a replayed request, and its predicted answer if there is one."""
        step = self.expect.answer_for(entry.method, entry.target, self.client(entry.address))
        return (step.name if step else f"{entry.method} other"), step

    def judge(self, entry: Entry, step: Step | None, status: int, location: str | None) -> str | None:
        forwarded = entry.address or "(no address)"
        if step is not None:
            return wrong_answer(step, status, location, forwarded)
        if entry.status is not None and status != entry.status:
            return f"{entry.method} {entry.target} from {forwarded}: got {status}, recorded {entry.status}"
        if entry.status is None and status >= 500:
            return f"{entry.method} {entry.target} from {forwarded}: got {status}"
        if status == 307 and urlsplit(location or "").netloc not in self.allowed_hosts:
            return f"{entry.method} {entry.target} from {forwarded}: redirect to an unconfigured host: {location!r}"
        return None


_replay: ReplayQueue | None = None


def replay_queue() -> ReplayQueue:
    global _replay
    if _replay is None:
        _replay = ReplayQueue(REPLAY_FILE)
    return _replay


def _send_replay_plans(runner: MasterRunner) -> None:
    """Tell each worker its share of the log and the common start time."""
    workers = sorted(c.id for c in runner.clients.ready + runner.clients.spawning + runner.clients.running)
    start_at = time.time() + REPLAY_LEAD
    for index, worker in enumerate(workers):
        runner.send_message("bench_replay_plan", {"index": index, "count": len(workers), "start_at": start_at},
                            worker)


class ReplayingClient(FastHttpUser):
    """Sends the next recorded request when it is due; many of them keep the schedule together."""

    abstract = not REPLAY_FILE
    wait_time = constant(0)

    @task
    def next_request(self) -> None:
        queue = replay_queue()
        if queue.base is None:  # the master's plan has not arrived yet
            gevent.sleep(0.05)
            return
        if not queue.pending:
            raise StopUser()
        item = queue.pending.popleft()
        due = queue.base + item.due
        if due > time.monotonic():
            gevent.sleep(due - time.monotonic())
        recorder.on_lateness(time.monotonic() - due)
        entry = item.entry
        name, step = queue.expected(entry)
        # Recorded without an address, the request comes from the rig's proxy itself.
        headers = {"X-Forwarded-For": f"{entry.address}, {TRUSTED_PROXY}"} if entry.address else {}
        with self.client.request(entry.method, entry.target, name=name, headers=headers,
                                 allow_redirects=False, catch_response=True) as response:
            check(response, queue.judge(entry, step, response.status_code, response.headers.get("Location")))
