"""Every benchmark, then every floor: the one command behind `make bench` (`benchmarks/bench`).

Runs, one after another (each its own process, on the same shared
machine, so never two at once):

| step | command | about |
| --- | --- | --- |
| footprint | benchmarks/footprint | 15 s |
| cold start | benchmarks/cold-start | 20 s |
| throughput | benchmarks/throughput --scaling --http ENGINES | 2-3 min |
| open-loop latency | benchmarks/latency-open-loop (without wrk2: closed-loop pacing) | 8-9 min |
| Locust latency steps | benchmarks/latency-steps | 4-6 min |
| memory | benchmarks/memory_flood.py --digests 800000 (the server's default 200,000 entries a cache) | 2-3 min |
| report | benchmarks/capacity-report | 10 s |

About 18-22 minutes in all on the 2-core reference machine. The memory
flood runs with the server's default caches (200,000 entries each), as the
floor is stated: 800,000 distinct digests make both caches evict about
twice (smaller caches spread the fixed costs over fewer entries and
overstate the bytes per entry: 334 bytes at 100,000 entries, 240 at
200,000, measured 2026-12-01).

Then it prints the scorecard (scorecard.py): every floor with its
measured figure and whether it is met, and the spread of each headline
figure over every recorded run. Results and history files land in
benchmarks/results/. A step that fails is reported and the others still
run; the exit status is 1 if any step failed.

`--quick` runs every step briefly (a few seconds each) to prove the
chain works, with its results in benchmarks/results/tmp/ (not kept in
git): its figures are not measurements.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from harness import BENCHMARKS, DEFAULT_ENGINE, RESULTS, WRK2_WHERE, find_wrk2
from scorecard import render as render_scorecard


def steps(args: argparse.Namespace, results: Path) -> list[tuple[str, list[str]]]:
    """(name, command) of every step, full or quick."""
    out = ["--results", str(results)]
    quick = args.quick
    python = [sys.executable]
    wrk2 = ["--wrk2", args.wrk2] if args.wrk2 else []
    return [
        ("footprint", [*python, str(BENCHMARKS / "footprint.py"), *out,
                       *(["--repeats", "3", "--starts", "1"] if quick else [])]),
        ("cold start", [*python, str(BENCHMARKS / "cold_start.py"), *out, *(["--starts", "3"] if quick else [])]),
        ("throughput", [*python, str(BENCHMARKS / "throughput.py"), "--scaling", "--http", args.http, *out,
                        *(["--seconds", "1", "--rounds", "1", "--scaling-rounds", "1"] if quick else [])]),
        ("open-loop latency", [*python, str(BENCHMARKS / "latency_open_loop.py"), "--http",
                               args.http.split(",")[0], *wrk2, *out,
                               *(["--seconds", "2", "--capacity-rounds", "1", "--capacity-seconds", "2",
                                   "--warmup", "1"] if quick else [])]),
        ("Locust latency steps", [*python, str(BENCHMARKS / "latency_steps.py"), *out,
                                  *(["--rates", "500,1000", "--seconds", "3", "--warmup", "1", "--prewarm", "2"]
                                    if quick else [])]),
        ("memory", [*python, str(BENCHMARKS / "memory_flood.py"), *out,
                    *(["--cache-size", "5000", "--digests", "20000", "--long-paths", "1000"] if quick
                      else ["--digests", "800000", "--long-paths", "10000"])]),
        ("report", [*python, str(BENCHMARKS / "capacity_report.py"), *out]),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="every step for a few seconds, results in benchmarks/results/tmp/ (a check, not figures)")
    parser.add_argument("--wrk2", help="the wrk2 binary (default: $WRK2, else wrk2 on PATH)")
    parser.add_argument("--http", default=DEFAULT_ENGINE,
                        help="HTTP engines for the throughput step, comma-separated, the first the default one; "
                        "the open-loop step uses the first")
    parser.add_argument("--skip", default="", help="comma-separated step names to leave out (e.g. memory)")
    args = parser.parse_args(argv)

    results = RESULTS / "tmp" if args.quick else RESULTS
    results.mkdir(parents=True, exist_ok=True)
    skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    if find_wrk2(args.wrk2) is None:
        print(f"benchmarks/bench: no wrk2, so the open-loop step measures closed-loop pacing (Locust) instead, "
              f"and its p99 floor is not judged: {WRK2_WHERE}", file=sys.stderr)
    timings: list[tuple[str, float, int | None]] = []
    started = time.monotonic()
    for name, command in steps(args, results):
        if name in skip:
            timings.append((name, 0.0, None))
            continue
        print(f"\n=== {name}: {' '.join(command)}", flush=True)
        began = time.monotonic()
        status = subprocess.run(command, check=False).returncode
        timings.append((name, time.monotonic() - began, status))
    print("\n# Benchmarks (benchmarks/bench" + (" --quick: NOT measurements" if args.quick else "") + ")\n")
    print("| step | seconds | exit status |\n| --- | ---: | --- |")
    for name, seconds, status in timings:
        print(f"| {name} | {seconds:.0f} | {'skipped' if status is None else status} |")
    print(f"\nTotal: {(time.monotonic() - started) / 60:.1f} minutes. Results: {results}\n")
    print(render_scorecard(results))
    # memory_flood.py exits 1 when the caches are not bounded: a finding, reported like any floor.
    failed = [name for name, _, status in timings if status not in (None, 0) and name != "memory"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
