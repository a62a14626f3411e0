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
   clients at real cloud addresses from ../shared/ranges where present)
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
    shared_ranges_dir,
    start_archeio,
    start_bucket,
    start_nginx,
)

P99_FLOOR_MS = 10.0
FLOOR_SHARE = 50
SATURATING_RATE = 1_000_000
DRIVEN_SHARE = 0.95  # of the requested rate
GENERATOR_CPU_LIMIT = 0.90  # of one core per wrk2 thread
MIX_REQUESTS = 50_000
LUA_HOOK = BENCHMARKS / "wrk2_mix.lua"

FIELDS = [
    "target", "share", "rate", "achieved_rps", "requests_measured", "p50_ms", "p99_ms", "p999_ms", "max_ms",
    "uncorrected_p50_ms", "uncorrected_p99_ms", "uncorrected_p999_ms", "server_cpu_us_per_request",
    "generator_cpu_share", "generator_cpu_us_per_request", "driven", "answers_200", "answers_307",
    "unexpected_answers", "wrong_locations", "socket_errors",
]

# -- wrk2 --------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def _distribution(section: str) -> dict[str, float]:
    """`50.000%    1.04ms` lines of one HdrHistogram section, in ms by percentile."""
    return {p: _ms(v) for p, v in re.findall(r"^\s*([\d.]+)%\s+([\d.]+(?:us|ms|s|m|h))\s*$", section, re.M)}


def parse_wrk2(output: str) -> dict[str, Any]:
    """The figures of one `wrk2 -U` run with the mix hook."""
    corrected, _, rest = output.partition("Uncorrected Latency")
    if "Recorded Latency" not in corrected or not rest:
        raise RuntimeError(f"cannot read wrk2 output (run with -U):\n{output}")
    right = _distribution(corrected.split("Recorded Latency", 1)[1].split("Detailed Percentile", 1)[0])
    raw = _distribution(rest.split("Detailed Percentile", 1)[0])
    total = re.search(r"(\d+) requests in ([\d.]+(?:us|ms|s|m|h))", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    measured = re.search(r"Total count\s*=\s*(\d+)", corrected)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    check = re.search(r"^mix-check: (\{.*\})$", output, re.M)
    max_value = re.search(r"#\[Max\s*=\s*([\d.]+)", corrected)
    if not total or not rps or not check:
        raise RuntimeError(f"cannot read wrk2 output:\n{output}")
    answers = json.loads(check[1])
    return {
        "requests": int(total[1]),
        "seconds": _ms(total[2]) / 1e3,
        "achieved_rps": float(rps[1]),
        "requests_measured": int(measured[1]) if measured else None,
        "p50_ms": right.get("50.000"), "p99_ms": right.get("99.000"), "p999_ms": right.get("99.900"),
        "max_ms": round(float(max_value[1]), 3) if max_value else right.get("100.000"),
        "uncorrected_p50_ms": raw.get("50.000"), "uncorrected_p99_ms": raw.get("99.000"),
        "uncorrected_p999_ms": raw.get("99.900"),
        "answers_200": answers["200"], "answers_307": answers["307"], "unexpected_answers": answers["other"],
        "wrong_locations": answers["wrong_location"], "problems": answers["examples"],
        "socket_errors": sum(int(n) for n in errors.groups()) if errors else 0,
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


@dataclass(frozen=True)
class Generator:
    wrk2: str
    connections: int
    threads: int
    cpus: str | None


def run_wrk2(generator: Generator, target: Target, rate: int, seconds: int) -> dict[str, Any]:
    """One wrk2 run; the server's CPU time and wrk2's own are read around it."""
    command = pinned(generator.cpus, [
        generator.wrk2, f"-t{generator.threads}", f"-c{generator.connections}", f"-d{seconds}s", f"-R{rate}",
        "-U", "-s", str(LUA_HOOK), f"http://{LOOPBACK}:{target.port}/", "--", str(target.requests_file),
        *([str(target.locations_file)] if target.locations_file else []),
    ])
    server_before, generator_before = cpu_seconds(target.pid), children_cpu_seconds()
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 120, check=False)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"wrk2 failed ({done.returncode}): {done.stderr}\n{done.stdout}")
    figures = parse_wrk2(done.stdout)
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
    """Each target's capacity: wrk2 saturating it, rounds alternating, the median."""
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    for round_ in range(1, rounds + 1):
        for target in targets:
            run = run_wrk2(generator, target, SATURATING_RATE, seconds)
            runs[target.name].append(run)
            log(f"  capacity round {round_} {target.name:<8} {run['achieved_rps']:>9.0f} req/s  server CPU "
                f"{run['server_cpu_share']:.2f} of a core, {run['server_cpu_us_per_request']} us/req; wrk2 CPU "
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
            # wrk2, not the server, ran out of CPU: the true capacity is higher.
            "generator_bound": generator_bound,
            "unexpected_answers": sum(r["unexpected_answers"] + r["wrong_locations"] for r in mine),
            "runs": mine,
        }
    return found


def floors(steps: list[dict[str, Any]], capacity: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    at_floor = next((s for s in steps if s["target"] == "archeio" and s["share"] == FLOOR_SHARE), None)
    ours = [s for s in steps if s["target"] == "archeio"]
    wrong = sum(s["unexpected_answers"] + s["wrong_locations"] + s["socket_errors"] for s in ours)
    wrong += capacity["archeio"]["unexpected_answers"]
    p99 = at_floor["p99_ms"] if at_floor and at_floor["driven"] else None
    return [
        {"floor": f"p99 <= {P99_FLOOR_MS:g} ms (corrected, wrk2) at {FLOOR_SHARE}% of one worker's capacity",
         "measured": p99 if p99 is not None else "not driven", "met": p99 is not None and p99 <= P99_FLOOR_MS},
        {"floor": "no answer but 200 or 307, no 307 to a Location the mix cannot produce, no socket error",
         "measured": wrong, "met": wrong == 0},
    ]


def render_markdown(result: dict[str, Any]) -> str:
    capacity = result["capacity"]
    lines = [
        "# Latency near capacity, open loop (benchmarks/latency-open-loop)",
        "",
        f"Machine: {machine_line(result['machine'])}.  ",
        f"Layout: {result['layout']}. Server: `archeio serve`, one worker, HTTP engine {result['engine']}, "
        f"ranges: {result['ranges']}. Generator: {result['generator']}, the realistic mix "
        f"({result['mix_requests']:,} requests of whole pulls, wrk2_mix.lua). Baseline: nginx `return 307` "
        "(one worker) at the same absolute rates.",
        "",
        "Capacity (wrk2 saturating, median of rounds, min-max):",
        "",
        "| server | req/s | range | server CPU share | server CPU us/req | a whole core at that cost, req/s | "
        "wrk2 CPU share | wrk2 CPU us/req |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, c in capacity.items():
        bound = " (wrk2-bound: a lower bound)" if c["generator_bound"] else ""
        lines.append(f"| {name} | {c['rps']:,}{bound} | {c['min']:,}-{c['max']:,} | {c['server_cpu_share']} | "
                     f"{c['server_cpu_us_per_request']} | {1e6 / c['server_cpu_us_per_request']:,.0f} | "
                     f"{c['generator_cpu_share']} | {c['generator_cpu_us_per_request']} |")
    lines += ["", "A server CPU share well below 1 at capacity means something else held it back: on a shared "
              "machine, usually the neighbours' processes on the same core. The shares below are of the req/s "
              "column, what the server got here."]
    lines += [
        "",
        f"Fixed rates, {result['seconds']} s measured each after wrk2's calibration; latency in ms, corrected "
        "(from the schedule) and uncorrected (from the send):",
        "",
        "| target | share of archeio's capacity | rate | achieved | p50 | p99 | p99.9 | max | uncorrected "
        "p50 / p99 / p99.9 | server CPU us/req | wrk2 CPU | driven | not 200/307, wrong Location |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for s in result["steps"]:
        lines.append(
            f"| {s['target']} | {s['share']}% | {s['rate']:,} | {s['achieved_rps']:,.0f} | {s['p50_ms']} | "
            f"{s['p99_ms']} | {s['p999_ms']} | {s['max_ms']} | {s['uncorrected_p50_ms']} / "
            f"{s['uncorrected_p99_ms']} / {s['uncorrected_p999_ms']} | {s['server_cpu_us_per_request']} | "
            f"{s['generator_cpu_share']} | {'yes' if s['driven'] else 'NO (generator)'} | "
            f"{s['unexpected_answers']}, {s['wrong_locations']} |")
    lines += ["", *floors_table(result["floors"])]
    return "\n".join(lines) + "\n"


def history_row(result: dict[str, Any]) -> dict[str, object]:
    info = result["machine"]
    row: dict[str, object] = {
        "date": info["date"], "code": info["archeio_commit"], "cpu_model": info["cpu_model"],
        "load_average": info["load_average_at_start"][0], "engine": result["engine"],
        "capacity_rps": result["capacity"]["archeio"]["rps"], "nginx_capacity_rps": result["capacity"]["nginx"]["rps"],
    }
    for s in result["steps"]:
        prefix = "" if s["target"] == "archeio" else "nginx_"
        row[f"{prefix}p99_ms_at_{s['share']}"] = s["p99_ms"]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/latency-open-loop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wrk2", help="the wrk2 binary (default: $WRK2, else wrk2 on PATH)")
    parser.add_argument("--seconds", type=int, default=60,
                        help="measured seconds per rate, after wrk2's calibration (default 60)")
    parser.add_argument("--shares", default="25,50,75", help="percent of archeio's capacity (default 25,50,75)")
    parser.add_argument("--connections", type=int, default=64, help="wrk2 connections (default 64)")
    parser.add_argument("--threads", type=int, default=1,
                        help="wrk2 threads, each on its own core when pinned (default 1)")
    parser.add_argument("--capacity-seconds", type=int, default=8, help="length of a capacity run (default 8)")
    parser.add_argument("--capacity-rounds", type=int, default=3, help="alternating capacity rounds (default 3)")
    parser.add_argument("--http", default=DEFAULT_ENGINE, help="archeio's HTTP engine (ARCHEIO_HTTP; default: "
                        "the server's own default)")
    parser.add_argument("--no-baseline", action="store_true", help="skip nginx at the same rates")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and wrk2 to separate CPUs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory for the result files")
    args = parser.parse_args(argv)

    wrk2 = find_wrk2(args.wrk2)
    if wrk2 is None:
        print(f"benchmarks/latency-open-loop: {WRK2_WHERE}", file=sys.stderr)
        return 2
    problem = engine_problem([args.http])
    if problem:
        print(f"benchmarks/latency-open-loop: {problem}", file=sys.stderr)
        return 2
    pin = can_pin() and not args.no_pin
    server_cpus = "0" if pin else None
    load_cpus = ",".join(str(1 + i) for i in range(args.threads)) if pin else None
    generator = Generator(wrk2, args.connections, args.threads, load_cpus)
    layout = (f"servers pinned to CPU 0, wrk2 and the stand-in bucket to CPU {load_cpus} (taskset)" if pin
              else "not pinned")
    info = machine()
    shares = [int(s) for s in args.shares.split(",")]
    calibration = calibration_seconds(args.connections, args.threads)
    ranges = shared_ranges_dir()
    print(f"machine: {machine_line(info)}\nlayout: {layout}")
    print(f"wrk2: {wrk2} -t{args.threads} -c{args.connections}, {args.seconds} s measured per rate "
          f"(+{calibration} s calibration), shares {shares} of capacity")
    steps: list[dict[str, Any]] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="archeio-open-loop-")))
        bucket_port, port, nginx_port = free_port(), free_port(), free_port()
        stack.enter_context(start_bucket(bucket_port, "--missing-share", "0.05", cpus=load_cpus,
                                         log=tmp / "bucket.log"))
        env = local_mirrors_env(tmp, bucket_port)
        env.update({"ARCHEIO_RANGES_DIR": str(ranges or ""), "ARCHEIO_LOG_LEVEL": "warning",
                    "BENCH_MISSING_SHARE": "0.05", **engine_settings(args.http)})
        archeio_mix, nginx_mix, locations = write_mix(env, tmp, MIX_REQUESTS, seed=1)
        server = stack.enter_context(start_archeio(env, port, server_cpus, log=tmp / "archeio.log"))
        targets = [Target("archeio", port, server.pid, archeio_mix, locations)]
        if not args.no_baseline:
            nginx = stack.enter_context(start_nginx(tmp, nginx_port, f"http://{LOOPBACK}:{bucket_port}/cdn",
                                                    server_cpus))
            targets.append(Target("nginx", nginx_port, nginx.pid, nginx_mix, None))
        # Fill the existence cache and warm every code path before measuring.
        run_wrk2(generator, targets[0], 5000, 5)
        capacity = measure_capacity(generator, targets, args.capacity_rounds, args.capacity_seconds, print)
        for share in shares:
            rate = max(1, round(capacity["archeio"]["rps"] * share / 100))
            for target in targets:
                step = run_wrk2(generator, target, rate, args.seconds + calibration)
                step["share"] = share
                steps.append(step)
                print(f"  {target.name:<8} {share}% = {rate:>6} req/s: achieved {step['achieved_rps']:.0f}, p50 "
                      f"{step['p50_ms']} ms, p99 {step['p99_ms']} ms, p99.9 {step['p999_ms']} ms (uncorrected p99 "
                      f"{step['uncorrected_p99_ms']} ms), server {step['server_cpu_us_per_request']} us/req, "
                      f"wrk2 CPU {step['generator_cpu_share']}"
                      + ("" if step["driven"] else "  <- wrk2 could not drive this rate")
                      + (f"  problems: {step['problems']}" if step["problems"] else ""))

    result: dict[str, Any] = {
        "machine": info, "layout": layout, "engine": args.http, "ranges": str(ranges or "embedded"),
        "generator": f"wrk2 -t{args.threads} -c{args.connections}", "wrk2": wrk2, "mix_requests": MIX_REQUESTS,
        "seconds": args.seconds, "calibration_seconds": calibration, "capacity": capacity, "steps": steps,
        "floors": floors(steps, capacity),
    }
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
