"""Latency under load: the realistic pull mix at fixed offered rates (`benchmarks/latency-steps`).

Starts the stand-in bucket and one `archeio serve` (one worker unless
`--workers`), every mirror and the default pointing at the bucket, then runs
headless Locust (benchmarks/locustfile.py) once per step at a fixed offered
rate: `users = rate / BENCH_USER_RATE`, each user paced by Locust's
constant-throughput wait. Per step it records the locustfile's exact
p50/p95/p99/p99.9/max over the window after the warm-up, the error rate
(a wrong redirect is an error), the rate actually achieved, the load
generator's own CPU share, the server's CPU time per request (from /proc,
summed over its processes) and the HEADs the bucket answered. After each
step the same Locust load (answers unchecked) goes to a one-worker nginx
answering a fixed 307, pinned like the server: its latency is what the
load generator and the machine add by themselves.

A step counts as driven when the generator achieved at least 95% of the
offered rate without running out of CPU; the first step it cannot drive
is reported as such (it says nothing about the server) and ends the run.
With two CPUs the server runs on CPU 0, Locust and the bucket on CPU 1.

Results: benchmarks/results/latency-steps.{csv,json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    LOOPBACK,
    RESULTS,
    append_history,
    bucket_counts,
    can_pin,
    children_cpu_seconds,
    cpu_seconds,
    floors_table,
    free_port,
    local_mirrors_env,
    machine,
    machine_busy_seconds,
    machine_line,
    run_locust,
    start_archeio,
    start_bucket,
    start_nginx,
)

DEFAULT_RATES = "250,500,1000,2000,4000,8000"
DRIVEN_SHARE = 0.95  # of the offered rate
GENERATOR_CPU_LIMIT = 0.90  # of one core: above it, measured latency includes the generator's queueing
P99_FLOOR_MS = 10.0
PREWARM_RATE = 1000
FLOOR_RATE = 1000

FIELDS = [
    "offered_rps", "users", "processes", "achieved_rps", "requests", "failures", "error_rate", "p50_ms", "p95_ms",
    "p99_ms", "p999_ms", "max_ms", "locust_p99_ms", "generator_cpu_share", "generator_cpu_cores",
    "generator_cpu_warnings", "driven", "server_cpu_us_per_request", "server_cpu_share", "bucket_heads",
    "neighbour_cpu_cores",
    "locust_exit", "nginx_achieved_rps", "nginx_p50_ms", "nginx_p99_ms", "nginx_max_ms", "nginx_cpu_us_per_request",
]


def step_env(rate: int, args: argparse.Namespace, env: dict[str, str]) -> tuple[int, dict[str, str]]:
    """Users for `rate`, and the locustfile's settings for one step."""
    users = max(1, math.ceil(rate / args.user_rate))
    return users, {**env, "BENCH_USER_RATE": f"{rate / users:g}", "BENCH_WARMUP": str(args.warmup)}


@dataclass(frozen=True)
class Rig:
    """The server under test, its stand-in bucket and where the load generator runs."""

    port: int
    server_pid: int
    bucket_port: int
    bucket_pid: int
    load_cpus: str | None
    processes: int = 1  # Locust processes (--processes): the master merges their samples


def start_rig(stack: ExitStack, tmp: Path, missing_share: float, ranges_dir: str, workers: int,
              server_cpus: str | None, load_cpus: str | None, processes: int = 1) -> tuple[Rig, dict[str, str]]:
    """The stand-in bucket and one `archeio serve` with every mirror on it (stopped with `stack`), and the settings."""
    bucket_port, port = free_port(), free_port()
    bucket = stack.enter_context(start_bucket(bucket_port, "--missing-share", str(missing_share),
                                              cpus=load_cpus, log=tmp / "bucket.log"))
    env = local_mirrors_env(tmp, bucket_port)
    env.update({"ARCHEIO_RANGES_DIR": ranges_dir, "ARCHEIO_WORKERS": str(workers),
                "ARCHEIO_LOG_LEVEL": "warning", "BENCH_MISSING_SHARE": str(missing_share)})
    server = stack.enter_context(start_archeio(env, port, server_cpus, log=tmp / "archeio.log"))
    return Rig(port, server.pid, bucket_port, bucket.pid, load_cpus, processes), env


def run_baseline(rate: int, args: argparse.Namespace, port: int, nginx_pid: int, env: dict[str, str], out: Path,
                 load_cpus: str | None) -> dict[str, Any]:
    """The same Locust load against the fixed-307 nginx: what the generator alone adds to latency."""
    users, locust_env = step_env(rate, args, {**env, "BENCH_CHECK": "0"})
    cpu_before = cpu_seconds(nginx_pid)
    _, summary, aggregated = run_locust(port, locust_env, users, args.warmup + args.seconds,
                                        out / f"nginx-{rate}", cpus=load_cpus, processes=args.processes)
    total = int(aggregated.get("Request Count") or 0)
    used = cpu_seconds(nginx_pid) - cpu_before
    return {
        "nginx_p50_ms": summary.get("p50_ms"), "nginx_p99_ms": summary.get("p99_ms"),
        "nginx_max_ms": summary.get("max_ms"), "nginx_achieved_rps": summary.get("achieved_rps"),
        "nginx_cpu_us_per_request": round(used / total * 1e6, 1) if total else None,
    }


def run_step(rate: int, args: argparse.Namespace, rig: Rig, env: dict[str, str], out: Path) -> dict[str, Any]:
    users, locust_env = step_env(rate, args, env)
    return measure_step(rig, rate, users, locust_env, args.warmup + args.seconds, out / f"step-{rate}")


def measure_step(rig: Rig, offered: float, users: int, locust_env: dict[str, str], wall: float,
                 out: Path) -> dict[str, Any]:
    """One Locust run against the rig, with the figures every step reports (and replays too)."""
    heads_before = sum(bucket_counts(rig.bucket_port).values())
    cpu_before = cpu_seconds(rig.server_pid)
    bucket_before = cpu_seconds(rig.bucket_pid)
    busy_before, locust_before = machine_busy_seconds(), children_cpu_seconds()
    started = time.monotonic()
    status, summary, aggregated = run_locust(rig.port, locust_env, users, wall, out, cpus=rig.load_cpus,
                                             processes=rig.processes)
    elapsed = time.monotonic() - started  # Locust's start-up included: the neighbours ran meanwhile too
    server_cpu = cpu_seconds(rig.server_pid) - cpu_before
    # What everyone else on the machine used meanwhile: the noise this step ran in.
    ours = server_cpu + (cpu_seconds(rig.bucket_pid) - bucket_before) + (children_cpu_seconds() - locust_before)
    neighbours = machine_busy_seconds() - busy_before - ours
    total_requests = int(aggregated.get("Request Count") or 0)
    heads = sum(bucket_counts(rig.bucket_port).values()) - heads_before
    if not summary:
        raise RuntimeError(f"Locust wrote no summary for the {offered:g} req/s step; see {out}/locust.log")
    achieved = summary["achieved_rps"]
    generator_busy = (summary["generator_cpu_share"] or 0) >= GENERATOR_CPU_LIMIT or summary["generator_cpu_warnings"]
    requests = summary["requests"]
    return {
        "offered_rps": offered,
        "users": users,
        "processes": rig.processes,
        "achieved_rps": achieved,
        "requests": requests,
        "failures": summary["failures"],
        "error_rate": round(summary["failures"] / requests, 6) if requests else None,
        "p50_ms": summary["p50_ms"],
        "p95_ms": summary["p95_ms"],
        "p99_ms": summary["p99_ms"],
        "p999_ms": summary["p999_ms"],
        "max_ms": summary["max_ms"],
        "locust_p99_ms": aggregated.get("99%"),
        "generator_cpu_share": summary["generator_cpu_share"],
        "generator_cpu_cores": summary.get("generator_cpu_cores"),
        "generator_cpu_warnings": summary["generator_cpu_warnings"],
        "driven": achieved >= DRIVEN_SHARE * offered and not generator_busy,
        "server_cpu_us_per_request": round(server_cpu / total_requests * 1e6, 1) if total_requests else None,
        "server_cpu_share": round(server_cpu / wall, 3),
        "bucket_heads": heads,
        "neighbour_cpu_cores": round(max(0.0, neighbours) / elapsed, 2),
        "locust_exit": status,
        "failure_examples": summary["failure_examples"],
        "lateness_ms": summary.get("lateness_ms"),
    }


def render_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Latency under load (benchmarks/latency-steps)",
        "",
        f"Machine: {machine_line(result['machine'])}.  ",
        f"Layout: {result['layout']}. Server: `archeio serve`, {result['workers']} worker(s), "
        f"ranges: {result['ranges']}. Realistic pull mix (benchmarks/locustfile.py), "
        f"{result['missing_share']:.0%} of blobs missing from the mirrors; existence cache pre-warmed for "
        f"{result['prewarm_seconds']} s; {result['seconds']} s measured per step after {result['warmup']} s "
        "warm-up.",
        "",
        "| offered req/s | achieved req/s | driven | p50 ms | p95 ms | p99 ms | p99.9 ms | max ms | errors | "
        "generator CPU | server CPU us/req | server CPU share | bucket HEADs | neighbours' CPU (cores) | "
        "nginx p50 / p99 ms | nginx CPU us/req |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for s in result["steps"]:
        lines.append(
            f"| {s['offered_rps']} | {s['achieved_rps']} | {'yes' if s['driven'] else 'NO (generator)'} | "
            f"{s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} | {s['p999_ms']} | {s['max_ms']} | {s['failures']} | "
            f"{s['generator_cpu_share']} | {s['server_cpu_us_per_request']} | {s['server_cpu_share']} | "
            f"{s['bucket_heads']} | {s['neighbour_cpu_cores']} | {s.get('nginx_p50_ms', '-')} / "
            f"{s.get('nginx_p99_ms', '-')} | {s.get('nginx_cpu_us_per_request', '-')} |")
    lines += ["", *floors_table(result["floors"])]
    return "\n".join(lines) + "\n"


def history_row(result: dict[str, Any]) -> dict[str, object]:
    """The run's headline figures, one line of the history CSV."""
    steps, info = result["steps"], result["machine"]
    at_floor = next((s for s in steps if s["offered_rps"] == FLOOR_RATE), {})
    return {
        "date": info["date"], "code": info["archeio_commit"], "cpu_model": info["cpu_model"],
        "load_average": info["load_average_at_start"][0], "processes": result.get("processes", 1),
        "highest_driven_rps": max((s["offered_rps"] for s in steps if s["driven"]), default=None),
        "failures_driven": sum(s["failures"] for s in steps if s["driven"]),
        f"p99_ms_at_{FLOOR_RATE}": at_floor.get("p99_ms"),
        f"nginx_p99_ms_at_{FLOOR_RATE}": at_floor.get("nginx_p99_ms"),
        f"server_cpu_us_at_{FLOOR_RATE}": at_floor.get("server_cpu_us_per_request"),
        f"neighbour_cores_at_{FLOOR_RATE}": at_floor.get("neighbour_cpu_cores"),
    }


def floors(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    at_floor = next((s for s in steps if s["offered_rps"] == FLOOR_RATE and s["driven"]), None)
    driven = [s for s in steps if s["driven"]]
    failures = sum(s["failures"] for s in driven)
    return [
        {"floor": f"p99 <= {P99_FLOOR_MS:g} ms for the realistic mix at {FLOOR_RATE} req/s, one worker",
         "measured": at_floor["p99_ms"] if at_floor else "not driven",
         "met": bool(at_floor and at_floor["p99_ms"] <= P99_FLOOR_MS)},
        {"floor": "zero failed or wrong redirects at every driven step",
         "measured": f"{failures} failures in {sum(s['requests'] for s in driven)} requests", "met": failures == 0},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/latency-steps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default=DEFAULT_RATES, help=f"offered req/s per step (default {DEFAULT_RATES})")
    parser.add_argument("--seconds", type=int, default=15, help="measured seconds per step (default 15)")
    parser.add_argument("--warmup", type=int, default=4, help="seconds per step before measuring (default 4)")
    parser.add_argument("--user-rate", type=float, default=50.0,
                        help="req/s per simulated client (default 50; see benchmarks/README.md)")
    parser.add_argument("--prewarm", type=int, default=20,
                        help=f"seconds of traffic at {PREWARM_RATE} req/s before the steps, to fill the existence "
                        "cache as in steady state (default 20; 0: start cold)")
    parser.add_argument("--workers", type=int, default=1, help="archeio worker processes (default 1)")
    parser.add_argument("--processes", type=int, default=1,
                        help="Locust processes (--processes: a master merging the samples of N workers; default 1)")
    parser.add_argument("--missing-share", type=float, default=0.05,
                        help="share of blobs missing from the mirrors (default 0.05)")
    parser.add_argument("--ranges-dir", default="",
                        help="ARCHEIO_RANGES_DIR for server and clients (default: the embedded data, all 3 clouds)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the same load against a fixed-307 nginx after each step")
    parser.add_argument("--keep-going", action="store_true", help="run every step, even past the generator's limit")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and generator to separate CPUs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory for the result files")
    args = parser.parse_args(argv)

    pin = can_pin() and not args.no_pin
    server_cpus, load_cpus = ("0", "1") if pin else (None, None)
    layout = ("server pinned to CPU 0, Locust and the stand-in bucket to CPU 1 (taskset)" if pin
              else "not pinned")
    info = machine()
    print(f"machine: {machine_line(info)}\nlayout: {layout}")
    steps: list[dict[str, Any]] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="archeio-latency-")))
        rig, env = start_rig(stack, tmp, args.missing_share, args.ranges_dir, args.workers, server_cpus, load_cpus,
                             args.processes)
        port, bucket_port = rig.port, rig.bucket_port
        nginx_port = free_port()
        nginx = None if args.no_baseline else stack.enter_context(
            start_nginx(tmp, nginx_port, f"http://{LOOPBACK}:{bucket_port}/cdn", server_cpus))
        prewarm = None
        if args.prewarm:
            first = PREWARM_RATE
            heads = sum(bucket_counts(bucket_port).values())
            _, prewarm, _ = run_locust(port, {**env, "BENCH_USER_RATE": str(args.user_rate)},
                                       max(1, math.ceil(first / args.user_rate)), args.prewarm, tmp / "prewarm",
                                       cpus=load_cpus)
            prewarm["bucket_heads"] = sum(bucket_counts(bucket_port).values()) - heads
            print(f"  pre-warm: {args.prewarm} s at {first} req/s, {prewarm['bucket_heads']} existence HEADs, "
                  f"{prewarm['failures']} failures")
        for rate in (int(r) for r in args.rates.split(",")):
            step = run_step(rate, args, rig, env, tmp)
            if nginx is not None:
                step.update(run_baseline(rate, args, nginx_port, nginx.pid, env, tmp, load_cpus))
            steps.append(step)
            print(f"  {rate:>6} req/s offered: {step['achieved_rps']:>8} achieved, p50 {step['p50_ms']} ms, "
                  f"p99 {step['p99_ms']} ms, max {step['max_ms']} ms, {step['failures']} failures, "
                  f"generator CPU {step['generator_cpu_share']}, server {step['server_cpu_us_per_request']} us/req, "
                  f"neighbours {step['neighbour_cpu_cores']} cores"
                  + (f"; nginx baseline p50 {step['nginx_p50_ms']} ms, p99 {step['nginx_p99_ms']} ms, "
                     f"{step['nginx_cpu_us_per_request']} us/req" if nginx is not None else "")
                  + ("" if step["driven"] else "  <- the load generator could not drive this step"))
            if step["failure_examples"]:
                print(f"    failures: {step['failure_examples']}")
            if not step["driven"] and not args.keep_going:
                break

    result = {
        "machine": info, "layout": layout, "workers": args.workers, "processes": args.processes,
        "ranges": args.ranges_dir or "embedded", "missing_share": args.missing_share,
        "seconds": args.seconds, "warmup": args.warmup, "user_rate": args.user_rate,
        "prewarm_seconds": args.prewarm, "prewarm": prewarm,
        "steps": steps, "floors": floors(steps),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    name = "latency-steps" if args.workers == 1 else f"latency-steps-{args.workers}w"
    (args.results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / f"{name}.md").write_text(render_markdown(result))
    with open(args.results / f"{name}.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(steps)
    append_history(args.results / f"{name}-history.csv", history_row(result))
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
