"""Latency near capacity, open loop: wrk2 at fixed shares of one worker's capacity (`benchmarks/latency-open-loop`).

Locust drives a few thousand requests/s from one process, far below what
one worker serves, and, like every closed-loop generator, it waits for an
answer before sending the next request: a stalled server then gets fewer
requests, and its stall hides from the percentiles (coordinated omission).
wrk2 sends on a fixed schedule instead and measures each request from
when it *should* have been sent, so a stall shows as latency.

One run:

1. the stand-in bucket, one `archeio serve` worker (pinned to CPU 0) with
   every mirror on the bucket, and a one-worker nginx `return 307` (CPU 0
   too); wrk2 and the bucket on CPU 1;
2. the realistic mix (traffic_mix.py, the Locust suite's: whole pulls,
   clients at real cloud addresses of the embedded range data)
   written to a file that wrk2's Lua hook (wrk2_mix.lua) sends, counting
   every answer that is not a 200 or a 307 and every 307 to a Location
   the mix cannot produce;
3. a short warm-up fills the existence cache, then the capacity of each
   server: wrk2 far above what it can serve (`-R` 1,000,000: it sends as
   fast as answers come back), `--capacity-rounds` alternating rounds,
   the median;
4. wrk2 at 25%, 50% and 75% of archeio's capacity, `--seconds` (60)
   measured at each, after wrk2's own calibration (its first 10 s plus 5 ms
   per connection, whose samples it discards itself); the same absolute
   rates against nginx right after each.

Why nginx gets the same absolute rates and not shares of its own
capacity: the baseline answers "what do the generator, the kernel and the
machine add at this many requests per second?". wrk2's own cost, its
timer slack and the loopback path grow with the rate, not with the
server's capacity; at the same rate nginx has more headroom, so its
latency is the floor under ours. Its capacity is measured the same way
and reported beside ours.

Reported per run: corrected p50/p99/p99.9/max (wrk2 `--latency`, from the
schedule) and uncorrected p50/p99/p99.9 (`-U`, from the actual send), the
achieved rate, the server's CPU time per request, wrk2's CPU share, and
the answers by status. Corrected latency has a floor of about 1 ms (wrk2
schedules with millisecond timers); uncorrected figures show the service
time below that. One wrk2 thread drives about 60,000 plain requests/s
per core; the Lua hook costs more (its CPU per request is reported, and
a run it could not drive is marked).

Without wrk2 (`--wrk2`, $WRK2, or wrk2 on PATH; benchmarks/README.md says
how to build it) the same run falls back to **closed-loop pacing**: the
capacity is measured by wrk (Debian's, the same mix hook, as fast as
answers come, as wrk2 does at `-R` 1,000,000), and each fixed rate is
driven by Locust's paced users (`constant_throughput`, `--user-rate`
requests/s each, the locustfile checking every answer exactly), up to the
rate they can drive: the first share Locust cannot drive is reported as
such beside its figure, and higher shares are not attempted. Paced users
still wait for each answer before their next request, so a stall can hide
from those percentiles: the figures are labelled closed-loop pacing, and
the p99 floor is not judged on them.

Floor (issue 13): p99 <= 10 ms at 50% of capacity, one worker.
Results: benchmarks/results/latency-open-loop.{json,csv,md}, a line in
latency-open-loop-history.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    BENCHMARKS,
    DEFAULT_ENGINE,
    EMBEDDED_RANGES,
    LOOPBACK,
    RESULTS,
    WRK2_WHERE,
    append_history,
    can_pin,
    children_cpu_seconds,
    cpu_seconds,
    engine_problem,
    engine_settings,
    find_wrk2,
    floors_table,
    free_port,
    local_mirrors_env,
    machine,
    machine_line,
    pinned,
    start_archeio,
    start_bucket,
    start_nginx,
)
from latency_steps import Rig, measure_step

P99_FLOOR_MS = 10.0
FLOOR_SHARE = 50
SATURATING_RATE = 1_000_000
DRIVEN_SHARE = 0.95  # of the requested rate
GENERATOR_CPU_LIMIT = 0.90  # of one core per wrk2 thread
MIX_REQUESTS = 50_000
LUA_HOOK = BENCHMARKS / "wrk2_mix.lua"
# How the fixed rates were driven.
OPEN_LOOP = "open loop (wrk2)"
PACING = "closed-loop pacing (Locust's paced users; no wrk2)"

FIELDS = [
    "target", "share", "rate", "achieved_rps", "requests_measured", "p50_ms", "p99_ms", "p999_ms", "max_ms",
    "uncorrected_p50_ms", "uncorrected_p99_ms", "uncorrected_p999_ms", "server_cpu_us_per_request",
    "generator_cpu_share", "generator_cpu_us_per_request", "driven", "answers_200", "answers_307",
    "unexpected_answers", "wrong_locations", "socket_errors", "users", "note",
]

# -- wrk2 (and wrk) ------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def _distribution(section: str) -> dict[str, float]:
    """`50.000%    1.04ms` lines of one HdrHistogram section, in ms by percentile."""
    return {p: _ms(v) for p, v in re.findall(r"^\s*([\d.]+)%\s+([\d.]+(?:us|ms|s|m|h))\s*$", section, re.M)}


def parse_wrk(output: str) -> dict[str, Any]:
    """Counts and rate of one run of wrk or wrk2 with the mix hook (wrk2_mix.lua)."""
    total = re.search(r"(\d+) requests in ([\d.]+(?:us|ms|s|m|h))", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    check = re.search(r"^mix-check: (\{.*\})$", output, re.M)
    if not total or not rps or not check:
        raise RuntimeError(f"cannot read wrk output:\n{output}")
    answers = json.loads(check[1])
    return {
        "requests": int(total[1]),
        "seconds": _ms(total[2]) / 1e3,
        "achieved_rps": float(rps[1]),
        "answers_200": answers["200"], "answers_307": answers["307"], "unexpected_answers": answers["other"],
        "wrong_locations": answers["wrong_location"], "problems": answers["examples"],
        "socket_errors": sum(int(n) for n in errors.groups()) if errors else 0,
    }


def parse_wrk2(output: str) -> dict[str, Any]:
    """The figures of one `wrk2 -U` run with the mix hook."""
    corrected, _, rest = output.partition("Uncorrected Latency")
    if "Recorded Latency" not in corrected or not rest:
        raise RuntimeError(f"cannot read wrk2 output (run with -U):\n{output}")
    right = _distribution(corrected.split("Recorded Latency", 1)[1].split("Detailed Percentile", 1)[0])
    raw = _distribution(rest.split("Detailed Percentile", 1)[0])
    measured = re.search(r"Total count\s*=\s*(\d+)", corrected)
    max_value = re.search(r"#\[Max\s*=\s*([\d.]+)", corrected)
    return {
        **parse_wrk(output),
        "requests_measured": int(measured[1]) if measured else None,
        "p50_ms": right.get("50.000"), "p99_ms": right.get("99.000"), "p999_ms": right.get("99.900"),
        "max_ms": round(float(max_value[1]), 3) if max_value else right.get("100.000"),
        "uncorrected_p50_ms": raw.get("50.000"), "uncorrected_p99_ms": raw.get("99.000"),
        "uncorrected_p999_ms": raw.get("99.900"),
    }


def calibration_seconds(connections: int, threads: int) -> int:
    """wrk2 discards each thread's first 10 s plus 5 ms per connection, then measures."""
    return math.ceil(10 + 0.005 * connections / threads) + 1


@dataclass(frozen=True)
class Target:
    """A server under the generator: its port, its process and the mix files it gets."""

    name: str
    port: int
    pid: int
    requests_file: Path
    locations_file: Path | None  # None: statuses only (nginx answers every request alike)
    admin_port: int | None = None  # archeio's: its loop lag and GC pauses are read around each step


@dataclass(frozen=True)
class Generator:
    """wrk2 (`open_loop`), else plain wrk: it only saturates, and Locust drives the fixed rates."""

    binary: str
    open_loop: bool
    connections: int
    threads: int
    cpus: str | None


def run_wrk(generator: Generator, target: Target, rate: int, seconds: int) -> dict[str, Any]:
    """One wrk2 run at `rate` (plain wrk: as fast as answers come); the server's CPU time and the generator's."""
    assert generator.open_loop or rate == SATURATING_RATE, "plain wrk cannot hold a rate"
    command = pinned(generator.cpus, [
        generator.binary, f"-t{generator.threads}", f"-c{generator.connections}", f"-d{seconds}s",
        *([f"-R{rate}", "-U"] if generator.open_loop else []),
        "-s", str(LUA_HOOK), f"http://{LOOPBACK}:{target.port}/", "--", str(target.requests_file),
        *([str(target.locations_file)] if target.locations_file else []),
    ])
    server_before, generator_before = cpu_seconds(target.pid), children_cpu_seconds()
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, check=False)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{generator.binary} failed ({done.returncode}): {done.stderr}\n{done.stdout}")
    figures = parse_wrk2(done.stdout) if generator.open_loop else parse_wrk(done.stdout)
    # The histograms hold the samples after calibration; the rate over that
    # window is the one the percentiles describe (the whole run's includes
    # the connections' staggered start).
    window = figures["seconds"] - (10 + 0.005 * generator.connections / generator.threads)
    if rate != SATURATING_RATE and figures["requests_measured"] and window > 0:
        figures["achieved_rps_whole_run"] = figures["achieved_rps"]
        figures["achieved_rps"] = round(figures["requests_measured"] / window, 1)
    server_cpu = cpu_seconds(target.pid) - server_before
    generator_cpu = children_cpu_seconds() - generator_before
    requests = figures["requests"]
    figures.update({
        "target": target.name, "rate": rate,
        "server_cpu_us_per_request": round(server_cpu / requests * 1e6, 2) if requests else None,
        "server_cpu_share": round(server_cpu / elapsed, 3),
        "generator_cpu_share": round(generator_cpu / elapsed / generator.threads, 3),
        "generator_cpu_us_per_request": round(generator_cpu / requests * 1e6, 2) if requests else None,
    })
    busy = figures["generator_cpu_share"] >= GENERATOR_CPU_LIMIT
    figures["driven"] = rate == SATURATING_RATE or (figures["achieved_rps"] >= DRIVEN_SHARE * rate and not busy)
    return figures


# -- closed-loop pacing (no wrk2) ---------------------------------------------------


@dataclass(frozen=True)
class Pacing:
    """What Locust's paced users need to drive one target."""

    env: dict[str, str]  # the server's settings and BENCH_* knobs
    user_rate: float
    warmup: int
    out: Path


def run_paced(pacing: Pacing, target: Target, rig: Rig, rate: int, seconds: int) -> dict[str, Any]:
    """Locust's paced users at `rate` against `target` (`rig`: the same server, as latency-steps sees it)."""
    users = max(1, math.ceil(rate / pacing.user_rate))
    env = {**pacing.env, "BENCH_USER_RATE": f"{rate / users:g}", "BENCH_WARMUP": str(pacing.warmup),
           **({} if target.locations_file else {"BENCH_CHECK": "0"})}
    row: dict[str, Any] = {"target": target.name, "rate": rate, "users": users}
    try:
        step = measure_step(rig, rate, users, env, pacing.warmup + seconds, pacing.out / f"{target.name}-{rate}")
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return {**row, "driven": False, "note": f"Locust gave no figures ({exc})"}
    row.update({key: step[key] for key in ("achieved_rps", "p50_ms", "p99_ms", "p999_ms", "max_ms",
                                           "server_cpu_us_per_request", "server_cpu_share", "generator_cpu_share",
                                           "driven")})
    row.update({"requests_measured": step["requests"], "unexpected_answers": step["failures"],
                # Locust's failures: wrong statuses, wrong Locations and errors alike.
                "wrong_locations": None, "socket_errors": None, "problems": step["failure_examples"]})
    if not step["driven"]:
        row["note"] = (f"Locust's paced users drove {step['achieved_rps']:,.0f} of {rate:,} req/s "
                       f"({users} users, generator CPU {step['generator_cpu_share']}): not this rate")
    return row


# -- the mix -----------------------------------------------------------------------


def write_mix(env: dict[str, str], directory: Path, count: int, seed: int) -> tuple[Path, Path, Path]:
    """The mix for archeio (with its expected Locations) and for nginx (HEAD sent as GET)."""
    from traffic_mix import Traffic

    mix = Traffic(env).requests(count, random.Random(seed))
    archeio_file, nginx_file, locations_file = (directory / "mix-archeio.tsv", directory / "mix-nginx.tsv",
                                                directory / "mix-locations.txt")
    archeio_file.write_text("".join(f"{s.method}\t{s.path}\t{c.forwarded}\n" for c, s in mix))
    # nginx answers a HEAD with the Content-Length of the body it did not send;
    # wrk2 cannot tell a HEAD's answer apart and would wait for that body.
    nginx_file.write_text("".join(f"GET\t{s.path}\t{c.forwarded}\n" for c, s in mix))
    locations_file.write_text("".join(sorted({f"{s.location}\n" for _, s in mix if s.location})))
    return archeio_file, nginx_file, locations_file


# -- the run ----------------------------------------------------------------------


def measure_capacity(generator: Generator, targets: list[Target], rounds: int, seconds: int,
                     log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Each target's capacity: the generator saturating it, rounds alternating, the median."""
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    tool = Path(generator.binary).name
    for round_ in range(1, rounds + 1):
        for target in targets:
            run = run_wrk(generator, target, SATURATING_RATE, seconds)
            runs[target.name].append(run)
            log(f"  capacity round {round_} {target.name:<8} {run['achieved_rps']:>9.0f} req/s  server CPU "
                f"{run['server_cpu_share']:.2f} of a core, {run['server_cpu_us_per_request']} us/req; {tool} CPU "
                f"{run['generator_cpu_share']:.2f}, {run['generator_cpu_us_per_request']} us/req")
    found = {}
    for name, mine in runs.items():
        rates = [r["achieved_rps"] for r in mine]
        generator_bound = statistics.median(r["generator_cpu_share"] for r in mine) >= GENERATOR_CPU_LIMIT and \
            statistics.median(r["server_cpu_share"] for r in mine) < GENERATOR_CPU_LIMIT
        found[name] = {
            "rps": round(statistics.median(rates)), "min": round(min(rates)), "max": round(max(rates)),
            "server_cpu_us_per_request": statistics.median(r["server_cpu_us_per_request"] for r in mine),
            "server_cpu_share": statistics.median(r["server_cpu_share"] for r in mine),
            "generator_cpu_share": statistics.median(r["generator_cpu_share"] for r in mine),
            "generator_cpu_us_per_request": statistics.median(r["generator_cpu_us_per_request"] for r in mine),
            # The generator, not the server, ran out of CPU: the true capacity is higher.
            "generator_bound": generator_bound,
            "unexpected_answers": sum(r["unexpected_answers"] + r["wrong_locations"] for r in mine),
            "runs": mine,
        }
    return found


def _wrong(step: dict[str, Any]) -> int:
    return sum(step.get(key) or 0 for key in ("unexpected_answers", "wrong_locations", "socket_errors"))


def floors(result: dict[str, Any]) -> list[dict[str, Any]]:
    steps, capacity = result["steps"], result["capacity"]
    at_floor = next((s for s in steps if s["target"] == "archeio" and s["share"] == FLOOR_SHARE), None)
    wrong = sum(_wrong(s) for s in steps if s["target"] == "archeio") + capacity["archeio"]["unexpected_answers"]
    p99 = at_floor["p99_ms"] if at_floor and at_floor["driven"] else None
    latency: dict[str, Any] = {
        "floor": f"p99 <= {P99_FLOOR_MS:g} ms (corrected, wrk2) at {FLOOR_SHARE}% of one worker's capacity",
        "measured": p99 if p99 is not None else "not driven", "met": p99 is not None and p99 <= P99_FLOOR_MS,
    }
    if result["mode"] == PACING:
        # Paced users wait for each answer: their p99 can hide a stall, so it cannot stand for wrk2's.
        latency.update({"met": None, "note": "no wrk2: closed-loop pacing cannot judge an open-loop floor "
                        "(benchmarks/README.md, Getting wrk2)"})
    return [
        latency,
        {"floor": "no answer but 200 or 307, no 307 to a Location the mix cannot produce, no socket error",
         "measured": wrong, "met": wrong == 0},
    ]


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def render_markdown(result: dict[str, Any]) -> str:
    capacity = result["capacity"]
    open_loop = result["mode"] == OPEN_LOOP
    tool = "wrk2" if open_loop else "wrk"
    lines = [
        f"# Latency near capacity, {result['mode']} (benchmarks/latency-open-loop)",
        "",
        f"Machine: {machine_line(result['machine'])}.  ",
        f"Layout: {result['layout']}. Server: `archeio serve`, one worker, HTTP engine {result['engine']}, "
        f"ranges: {result['ranges']}. Generator: {result['generator']}, the realistic mix "
        f"({result['mix_requests']:,} requests of whole pulls). Baseline: nginx `return 307` "
        "(one worker) at the same absolute rates.",
        "",
        f"Capacity ({tool} saturating, median of rounds, min-max):",
        "",
        "| server | req/s | range | server CPU share | server CPU us/req | a whole core at that cost, req/s | "
        f"{tool} CPU share | {tool} CPU us/req |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, c in capacity.items():
        bound = f" ({tool}-bound: a lower bound)" if c["generator_bound"] else ""
        lines.append(f"| {name} | {c['rps']:,}{bound} | {c['min']:,}-{c['max']:,} | {c['server_cpu_share']} | "
                     f"{c['server_cpu_us_per_request']} | {1e6 / c['server_cpu_us_per_request']:,.0f} | "
                     f"{c['generator_cpu_share']} | {c['generator_cpu_us_per_request']} |")
    lines += ["", "A server CPU share well below 1 at capacity means something else held it back: on a shared "
              "machine, usually the neighbours' processes on the same core. The shares below are of the req/s "
              "column, what the server got here."]
    if open_loop:
        lines += ["", f"Fixed rates, {result['seconds']} s measured each after wrk2's calibration; latency in ms, "
                  "corrected (from the schedule) and uncorrected (from the send):"]
    else:
        lines += ["", f"Fixed rates, **closed-loop pacing**: Locust's paced users ({result['user_rate']:g} req/s "
                  f"each, `constant_throughput`), {result['seconds']} s measured each after {result['warmup']} s "
                  "of warm-up, every answer checked; latency in ms from the send. A paced user waits for each "
                  "answer, so a stall can hide from these percentiles (no correction for coordinated omission): "
                  "wrk2 gives the open-loop figures (benchmarks/README.md, Getting wrk2)."]
    lines += [
        "",
        "| target | share of archeio's capacity | rate | achieved | p50 | p99 | p99.9 | max | uncorrected "
        "p50 / p99 / p99.9 | server CPU us/req | generator CPU | driven | not 200/307, wrong Location |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for s in result["steps"]:
        achieved = "-" if s.get("achieved_rps") is None else f"{s['achieved_rps']:,.0f}"
        driven = "yes" if s["driven"] else f"NO: {s.get('note') or 'the generator could not drive it'}"
        wrong = (f"{_cell(s.get('unexpected_answers'))}, {_cell(s.get('wrong_locations'))}" if open_loop
                 else f"{_cell(s.get('unexpected_answers'))} (Locust's failures)")
        lines.append(
            f"| {s['target']} | {s['share']}% | {s['rate']:,} | {achieved} | {_cell(s.get('p50_ms'))} | "
            f"{_cell(s.get('p99_ms'))} | {_cell(s.get('p999_ms'))} | {_cell(s.get('max_ms'))} | "
            f"{_cell(s.get('uncorrected_p50_ms'))} / {_cell(s.get('uncorrected_p99_ms'))} / "
            f"{_cell(s.get('uncorrected_p999_ms'))} | {_cell(s.get('server_cpu_us_per_request'))} | "
            f"{_cell(s.get('generator_cpu_share'))} | {driven} | {wrong} |")
    looped = [s for s in result["steps"] if s.get("loop")]
    if looped:
        lines += ["", "The server's event loop during each step (its admin port: archeio_event_loop_lag_seconds, "
                  "a timer's lateness sampled every 50 ms, and archeio_gc_pause_seconds):", ""]
        lines += [f"- {s['share']}%, {s['rate']:,} req/s: {s['loop']}" for s in looped]
    if result["not_attempted"]:
        lines += ["", *(f"- {share}% = {rate:,} req/s: not attempted, {why}"
                        for share, rate, why in result["not_attempted"])]
    lines += ["", *floors_table(result["floors"])]
    return "\n".join(lines) + "\n"


def history_row(result: dict[str, Any]) -> dict[str, object]:
    info = result["machine"]
    row: dict[str, object] = {
        "date": info["date"], "code": info["archeio_commit"], "cpu_model": info["cpu_model"],
        "load_average": info["load_average_at_start"][0], "engine": result["engine"],
        "generator": "wrk2" if result["mode"] == OPEN_LOOP else "locust-pacing",
        "capacity_rps": result["capacity"]["archeio"]["rps"],
        "nginx_capacity_rps": result["capacity"].get("nginx", {}).get("rps"),
    }
    # Paced figures get columns of their own: the wrk2 columns' spread stays open-loop only.
    paced = "" if result["mode"] == OPEN_LOOP else "paced_"
    for s in result["steps"]:
        prefix = "" if s["target"] == "archeio" else "nginx_"
        row[f"{paced}{prefix}p99_ms_at_{s['share']}"] = s.get("p99_ms")
    return row


# The server's own view of a step (archeio's admin port, loopstats.py): how often its event loop
# was held how long, and its garbage collections. Buckets in seconds, as exported.
_LOOP_FAMILIES = ("archeio_event_loop_lag_seconds", "archeio_gc_pause_seconds")


def loop_figures(admin_port: int | None) -> dict[str, float] | None:
    """Cumulative lag and GC-pause counts and sums from /metrics; None without them (an older server)."""
    if admin_port is None:
        return None
    import re
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{admin_port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    found: dict[str, float] = {}
    for family in _LOOP_FAMILIES:
        for match in re.finditer(rf'^{family}_(bucket|count|sum)(?:{{([^}}]*)}})? (\S+)$', text, re.M):
            found[f"{family}_{match[1]}{{{match[2] or ''}}}"] = float(match[3])
    return found or None


def loop_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, Any]:
    """What the step added: lag samples over 1, 5 and 25 ms and their share; collections and their time."""
    if not before or not after:
        return {}
    d = {key: after[key] - before.get(key, 0.0) for key in after}
    lag = "archeio_event_loop_lag_seconds"
    samples = d.get(f"{lag}_count{{}}", 0.0)
    over = {}
    for bound in ("0.001", "0.005", "0.025"):
        within = d.get(f'{lag}_bucket{{le="{bound}"}}', 0.0)
        over[bound] = samples - within
    gcs = {g: (d.get(f'archeio_gc_pause_seconds_count{{generation="{g}"}}', 0.0),
               d.get(f'archeio_gc_pause_seconds_sum{{generation="{g}"}}', 0.0)) for g in "012"}
    text = (f"lag samples {samples:.0f}, over 1/5/25 ms {over['0.001']:.0f}/{over['0.005']:.0f}/"
            f"{over['0.025']:.0f}, mean {1e3 * d.get(f'{lag}_sum{{}}', 0.0) / max(samples, 1):.2f} ms; GC "
            + ", ".join(f"gen{g} {n:.0f} ({1e3 * t:.1f} ms)" for g, (n, t) in gcs.items()))
    return {"loop": text, "lag_samples": samples, "lag_over_1ms": over["0.001"], "lag_over_5ms": over["0.005"],
            "gc_collections": {g: n for g, (n, _) in gcs.items()},
            "gc_seconds": {g: round(t, 4) for g, (_, t) in gcs.items()}}


def drive_open_loop(generator: Generator, targets: list[Target], capacity: dict[str, dict[str, Any]],
                    shares: list[int], seconds: int) -> list[dict[str, Any]]:
    """wrk2 at each share of archeio's capacity, every target at the same absolute rate."""
    steps = []
    for share in shares:
        rate = max(1, round(capacity["archeio"]["rps"] * share / 100))
        for target in targets:
            before = loop_figures(target.admin_port)
            step = run_wrk(generator, target, rate, seconds + calibration_seconds(generator.connections,
                                                                                  generator.threads))
            step["share"] = share
            step.update(loop_delta(before, loop_figures(target.admin_port)))
            steps.append(step)
            print(f"  {target.name:<8} {share}% = {rate:>6} req/s: achieved {step['achieved_rps']:.0f}, p50 "
                  f"{step['p50_ms']} ms, p99 {step['p99_ms']} ms, p99.9 {step['p999_ms']} ms (uncorrected p99 "
                  f"{step['uncorrected_p99_ms']} ms), server {step['server_cpu_us_per_request']} us/req, "
                  f"wrk2 CPU {step['generator_cpu_share']}"
                  + (f", server loop: {step['loop']}" if step.get("loop") else "")
                  + ("" if step["driven"] else "  <- wrk2 could not drive this rate")
                  + (f"  problems: {step['problems']}" if step["problems"] else ""))
    return steps


def drive_paced(pacing: Pacing, targets: list[Target], rigs: dict[str, Rig], capacity: dict[str, dict[str, Any]],
                shares: list[int], seconds: int) -> tuple[list[dict[str, Any]], list[tuple[int, int, str]]]:
    """Locust's paced users at each share, up to the first rate they cannot drive; (steps, not attempted)."""
    steps: list[dict[str, Any]] = []
    skipped: list[tuple[int, int, str]] = []
    for share in sorted(shares):
        rate = max(1, round(capacity["archeio"]["rps"] * share / 100))
        if skipped or (steps and not steps[-1]["driven"]):
            reached = next((s.get("achieved_rps") for s in steps if not s["driven"]), None)
            skipped.append((share, rate, "above the rate Locust's paced users could drive"
                            + (f" ({reached:,.0f} req/s)" if reached is not None else "")))
            print(f"  {share}% = {rate:>6} req/s: not attempted ({skipped[-1][2]})")
            continue
        for target in targets:
            step = run_paced(pacing, target, rigs[target.name], rate, seconds)
            step["share"] = share
            steps.append(step)
            print(f"  {target.name:<8} {share}% = {rate:>6} req/s, {step['users']} paced users: achieved "
                  f"{_cell(step.get('achieved_rps'))}, p50 {_cell(step.get('p50_ms'))} ms, p99 "
                  f"{_cell(step.get('p99_ms'))} ms, server {_cell(step.get('server_cpu_us_per_request'))} us/req"
                  + ("" if step["driven"] else f"  <- {step['note']}"))
            if not step["driven"]:
                break  # the baseline at a rate the generator cannot drive says nothing either
    return steps, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/latency-open-loop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wrk2", help="the wrk2 binary (default: $WRK2, else wrk2 on PATH)")
    parser.add_argument("--seconds", type=int, default=60,
                        help="measured seconds per rate, after wrk2's calibration (default 60)")
    parser.add_argument("--shares", default="25,50,75", help="percent of archeio's capacity (default 25,50,75)")
    parser.add_argument("--connections", type=int, default=64, help="wrk2 (or wrk) connections (default 64)")
    parser.add_argument("--threads", type=int, default=1,
                        help="wrk2 (or wrk) threads, each on its own core when pinned (default 1)")
    parser.add_argument("--capacity-seconds", type=int, default=8, help="length of a capacity run (default 8)")
    parser.add_argument("--capacity-rounds", type=int, default=3, help="alternating capacity rounds (default 3)")
    parser.add_argument("--user-rate", type=float, default=50.0,
                        help="without wrk2: req/s per paced Locust user (default 50, as benchmarks/latency-steps)")
    parser.add_argument("--warmup", type=int, default=4,
                        help="without wrk2: seconds of each paced run before measuring (default 4)")
    parser.add_argument("--http", default=DEFAULT_ENGINE, help="archeio's HTTP engine (ARCHEIO_HTTP; default: "
                        "the server's own default)")
    parser.add_argument("--no-baseline", action="store_true", help="skip nginx at the same rates")
    parser.add_argument("--tree", type=Path, metavar="PATH",
                        help="serve another checkout's code (the code before a change) with this interpreter")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and the generator to separate CPUs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory for the result files")
    args = parser.parse_args(argv)

    wrk2 = find_wrk2(args.wrk2)
    binary = wrk2 or shutil.which("wrk")
    if binary is None:
        print(f"benchmarks/latency-open-loop: neither wrk2 nor wrk: {WRK2_WHERE}; without it, wrk (Debian "
              "package `wrk`) measures the capacity and Locust paces the rates", file=sys.stderr)
        return 2
    problem = engine_problem([args.http])
    if problem:
        print(f"benchmarks/latency-open-loop: {problem}", file=sys.stderr)
        return 2
    mode = OPEN_LOOP if wrk2 else PACING
    pin = can_pin() and not args.no_pin
    server_cpus = "0" if pin else None
    load_cpus = ",".join(str(1 + i) for i in range(args.threads)) if pin else None
    generator = Generator(binary, wrk2 is not None, args.connections, args.threads, load_cpus)
    tools = "wrk2" if wrk2 else "wrk, Locust"
    layout = (f"servers pinned to CPU 0, {tools} and the stand-in bucket to CPU {load_cpus} (taskset)" if pin
              else "not pinned")
    info = machine()
    shares = [int(s) for s in args.shares.split(",")]
    print(f"machine: {machine_line(info)}\nlayout: {layout}")
    if wrk2:
        print(f"wrk2: {wrk2} -t{args.threads} -c{args.connections}, {args.seconds} s measured per rate "
              f"(+{calibration_seconds(args.connections, args.threads)} s calibration), shares {shares} of capacity")
    else:
        print(f"no wrk2, so closed-loop pacing: capacity by {binary} -t{args.threads} -c{args.connections}, "
              f"fixed rates by Locust's paced users ({args.user_rate:g} req/s each), {args.seconds} s measured "
              f"per rate after {args.warmup} s; shares {shares} of capacity, up to the first Locust cannot drive")
    not_attempted: list[tuple[int, int, str]] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="archeio-open-loop-")))
        bucket_port, port, nginx_port = free_port(), free_port(), free_port()
        bucket = stack.enter_context(start_bucket(bucket_port, "--missing-share", "0.05", cpus=load_cpus,
                                                  log=tmp / "bucket.log"))
        env = local_mirrors_env(tmp, bucket_port)
        env.update({**EMBEDDED_RANGES, "ARCHEIO_LOG_LEVEL": "warning", "BENCH_MISSING_SHARE": "0.05",
                    **engine_settings(args.http)})
        archeio_mix, nginx_mix, locations = write_mix(env, tmp, MIX_REQUESTS, seed=1)
        admin_port = free_port()
        server = stack.enter_context(start_archeio({**env, "ARCHEIO_ADMIN_PORT": str(admin_port),
                                                    "ARCHEIO_ADMIN_HOST": LOOPBACK},
                                                   port, server_cpus, log=tmp / "archeio.log", tree=args.tree))
        targets = [Target("archeio", port, server.pid, archeio_mix, locations, admin_port)]
        if not args.no_baseline:
            nginx = stack.enter_context(start_nginx(tmp, nginx_port, f"http://{LOOPBACK}:{bucket_port}/cdn",
                                                    server_cpus))
            targets.append(Target("nginx", nginx_port, nginx.pid, nginx_mix, None))
        # Fill the existence cache and warm every code path before measuring.
        if wrk2:
            run_wrk(generator, targets[0], 5000, 5)
        else:
            run_wrk(generator, targets[0], SATURATING_RATE, 5)
        capacity = measure_capacity(generator, targets, args.capacity_rounds, args.capacity_seconds, print)
        if wrk2:
            steps = drive_open_loop(generator, targets, capacity, shares, args.seconds)
        else:
            pacing = Pacing(env, args.user_rate, args.warmup, tmp / "locust")
            rigs = {t.name: Rig(t.port, t.pid, bucket_port, bucket.pid, load_cpus) for t in targets}
            steps, not_attempted = drive_paced(pacing, targets, rigs, capacity, shares, args.seconds)

    result: dict[str, Any] = {
        "machine": info, "layout": layout, "engine": args.http, "ranges": "embedded", "mode": mode,
        "tree": str(args.tree) if args.tree else None,
        "generator": (f"wrk2 -t{args.threads} -c{args.connections} (wrk2_mix.lua)" if wrk2 else
                      f"Locust's paced users at {args.user_rate:g} req/s each (locustfile.py); capacity: wrk "
                      f"-t{args.threads} -c{args.connections} (wrk2_mix.lua)"),
        "wrk2": wrk2, "mix_requests": MIX_REQUESTS, "seconds": args.seconds,
        "calibration_seconds": calibration_seconds(args.connections, args.threads) if wrk2 else None,
        "user_rate": None if wrk2 else args.user_rate, "warmup": None if wrk2 else args.warmup,
        "capacity": capacity, "steps": steps, "not_attempted": not_attempted,
    }
    result["floors"] = floors(result)
    write_results(args.results, result)
    print(render_markdown(result))
    return 0


def write_results(directory: Path, result: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "latency-open-loop.json").write_text(json.dumps(result, indent=2) + "\n")
    (directory / "latency-open-loop.md").write_text(render_markdown(result))
    with open(directory / "latency-open-loop.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["steps"])
    append_history(directory / "latency-open-loop-history.csv", history_row(result))


if __name__ == "__main__":
    sys.exit(main())
