"""Capacity planning on a real traffic shape: replay a recorded access log (`benchmarks/replay`).

Starts the stand-in bucket and one `archeio serve` (one worker unless
`--workers`; every mirror and the default pointing at the bucket, as in
benchmarks/latency-steps), then runs headless Locust in replay mode
(locustfile.py with `BENCH_REPLAY`): every recorded request is sent once,
at its recorded arrival time divided by `--speedup`, from its recorded
client address (`X-Forwarded-For: <address>, 127.0.0.1`), and its answer
is checked like the synthetic mix's. With `--processes N` Locust runs N
worker processes, each replaying whole clients, and the master merges
their samples.

The log is archeio's own JSON access lines (`ARCHEIO_ACCESS_LOG=1`, the
server's stderr) or a plain list of `[TIME] METHOD TARGET ADDRESS` lines
(without times, give `--rate`); see access_replay.py.

The report has the latency steps' figures (achieved rate, exact p50 to
p99.9 and max, failures, generator CPU, server CPU per request, existence
HEADs, the neighbours' CPU), plus how late the generator sent requests
against the schedule (if it fell behind, the arrival pattern was not
kept) and the log's mix: requests by kind and by client cloud.

Results: benchmarks/results/replay.{json,md}, a line in replay-history.csv.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections import Counter
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from access_replay import Entry, parse_log, schedule, span_seconds
from harness import (
    RESULTS,
    append_history,
    can_pin,
    floors_table,
    machine,
    machine_line,
)
from latency_steps import measure_step, start_rig
from traffic_mix import Expectations

LATE_MS = 10.0  # a request sent later than this against its schedule changes the arrival pattern
LATE_SHARE_LIMIT = 0.01


def log_mix(entries: list[Entry], expect: Expectations) -> dict[str, dict[str, int]]:
    """The log's requests by kind (the statistics names) and by the client's cloud."""
    kinds: Counter[str] = Counter()
    places: Counter[str] = Counter()
    for entry in entries:
        client = expect.client(entry.address) if entry.address else None
        step = expect.answer_for(entry.method, entry.target, client)
        kinds[step.name if step else f"{entry.method} other"] += 1
        if client is None:
            places["(no valid address)"] += 1
        else:
            places[client.placement.cloud if client.placement else "unknown"] += 1
    return {"kinds": dict(kinds.most_common()), "clouds": dict(places.most_common())}


def render_markdown(result: dict[str, Any]) -> str:
    s = result["step"]
    late = s.get("lateness_ms") or {}
    lines = [
        "# Replay of a recorded access log (benchmarks/replay)",
        "",
        f"Machine: {machine_line(result['machine'])}.  ",
        f"Layout: {result['layout']}. Server: `archeio serve`, {result['workers']} worker(s), ranges: "
        f"{result['ranges']}. Log: `{result['log']}`, {result['entries']} requests over {result['span_seconds']} s "
        f"as recorded, replayed {result['speedup']:g}x faster ({result['offered_rps']} req/s on average) by "
        f"{s['processes']} Locust process(es) with {s['users']} users.",
        "",
        "| offered req/s (average) | achieved req/s | p50 ms | p95 ms | p99 ms | p99.9 ms | max ms | errors | "
        "generator CPU (busiest process) | server CPU us/req | bucket HEADs | neighbours' CPU (cores) | "
        "late p99 ms | sent > 10 ms late |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {s['offered_rps']} | {s['achieved_rps']} | {s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} | "
        f"{s['p999_ms']} | {s['max_ms']} | {s['failures']} | {s['generator_cpu_share']} | "
        f"{s['server_cpu_us_per_request']} | {s['bucket_heads']} | {s['neighbour_cpu_cores']} | "
        f"{late.get('p99', '-')} | {late.get('share_over_10ms', '-')} |",
        "",
        f"Requests replayed: {s['requests']} of {result['entries']}.",
        "",
        "The log's mix (each request is sent once, so the replay's mix is the log's):",
        "",
        "| kind | requests |  | client cloud | requests |",
        "| --- | ---: | --- | --- | ---: |",
    ]
    kinds = list(result["mix"]["kinds"].items())
    clouds = list(result["mix"]["clouds"].items())
    for i in range(max(len(kinds), len(clouds))):
        kind, count = kinds[i] if i < len(kinds) else ("", "")
        cloud, n = clouds[i] if i < len(clouds) else ("", "")
        lines.append(f"| {kind} | {count} |  | {cloud} | {n} |")
    if s["failure_examples"]:
        lines += ["", "Failures:", "", *[f"- {text} ({n}x)" for text, n in s["failure_examples"].items()]]
    lines += ["", *floors_table(result["floors"])]
    return "\n".join(lines) + "\n"


def floors(result: dict[str, Any]) -> list[dict[str, Any]]:
    s = result["step"]
    late = (s.get("lateness_ms") or {}).get("share_over_10ms")
    return [
        {"floor": "every recorded request replayed", "measured": f"{s['requests']} of {result['entries']}",
         "met": s["requests"] == result["entries"]},
        {"floor": "zero failed or wrong answers", "measured": s["failures"], "met": s["failures"] == 0},
        {"floor": f"arrival pattern kept: <= {LATE_SHARE_LIMIT:.0%} of requests sent > {LATE_MS:g} ms late",
         "measured": late, "met": late is not None and late <= LATE_SHARE_LIMIT},
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", type=Path, required=True, help="access log to replay (JSON access lines or a list)")
    parser.add_argument("--speedup", type=float, default=1.0, help="replay this many times faster (default 1)")
    parser.add_argument("--rate", type=float, help="requests/s for a plain list without times")
    parser.add_argument("--processes", type=int, default=1, help="Locust processes (default 1)")
    parser.add_argument("--users", type=int, default=64,
                        help="simulated clients per Locust process; each has one request in flight (default 64)")
    parser.add_argument("--workers", type=int, default=1, help="archeio worker processes (default 1)")
    parser.add_argument("--missing-share", type=float, default=0.05,
                        help="share of blobs missing from the mirrors (default 0.05)")
    parser.add_argument("--ranges-dir", default="",
                        help="ARCHEIO_RANGES_DIR for server and clients (default: the embedded data)")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds left out of the summary (default 0)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and generator to separate CPUs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory for the result files")
    args = parser.parse_args(argv)

    with open(args.log) as lines:
        entries, skipped = parse_log(lines)
    if not entries:
        print(f"benchmarks/replay: no requests in {args.log}", file=sys.stderr)
        return 2
    plan = schedule(entries, args.speedup, args.rate)
    span = span_seconds(plan)
    offered = round(len(plan) / span, 1) if span else float(len(plan))
    pin = can_pin() and not args.no_pin
    server_cpus, load_cpus = ("0", "1") if pin else (None, None)
    layout = "server pinned to CPU 0, Locust and the stand-in bucket to CPU 1 (taskset)" if pin else "not pinned"
    info = machine()
    print(f"machine: {machine_line(info)}\nlayout: {layout}")
    print(f"log: {len(entries)} requests ({skipped} other lines skipped), {span:.1f} s at speed-up "
          f"{args.speedup:g}: {offered} req/s on average")
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="archeio-replay-")))
        rig, env = start_rig(stack, tmp, args.missing_share, args.ranges_dir, args.workers, server_cpus, load_cpus,
                             args.processes)
        mix = log_mix(entries, Expectations(env))
        replay_env = {**env, "BENCH_REPLAY": str(args.log.resolve()), "BENCH_REPLAY_SPEEDUP": str(args.speedup),
                      "BENCH_WARMUP": str(args.warmup), **({"BENCH_REPLAY_RATE": str(args.rate)} if args.rate else {})}
        # The schedule starts a second after the test does (BENCH_REPLAY_LEAD); a few more let the last answers in.
        wall = math.ceil(span + 4)
        step = measure_step(rig, offered, args.users * args.processes, replay_env, wall, tmp / "replay")
    result: dict[str, Any] = {
        "machine": info, "layout": layout, "workers": args.workers, "ranges": args.ranges_dir or "embedded",
        "log": str(args.log), "entries": len(entries), "skipped_lines": skipped,
        "span_seconds": round(span * args.speedup, 1), "speedup": args.speedup, "offered_rps": offered,
        "mix": mix, "step": step,
    }
    result["floors"] = floors(result)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "replay.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "replay.md").write_text(render_markdown(result))
    append_history(args.results / "replay-history.csv", {
        "date": info["date"], "code": info["archeio_commit"], "cpu_model": info["cpu_model"],
        "load_average": info["load_average_at_start"][0], "log": args.log.name, "entries": len(entries),
        "speedup": args.speedup, "offered_rps": offered, "achieved_rps": step["achieved_rps"],
        "p99_ms": step["p99_ms"], "failures": step["failures"],
        "late_share": (step.get("lateness_ms") or {}).get("share_over_10ms"),
        "server_cpu_us_per_request": step["server_cpu_us_per_request"],
    })
    print(render_markdown(result))
    return 0 if all(f["met"] for f in result["floors"][:2]) else 1


if __name__ == "__main__":
    sys.exit(main())
