"""Throughput ceiling of the hot paths against a near-limit nginx baseline (`benchmarks/throughput`).

One run measures, for each target, requests/s and p99 (wrk `-t1 -c64
--latency`) and the server's CPU time per request (its own utime + stime
from /proc, summed over its processes, read before and after each wrk
run):

- nginx: one worker answering every request with a fixed `return 307`,
  the near-limit baseline;
- `manifest`: a manifest by tag, redirected upstream;
- `blob-aws`: a blob from an AWS eu-west-3 client (X-Forwarded-For
  `35.180.1.1, 127.0.0.1`) whose regional mirror, a local stand-in
  bucket, holds it: the cache is warm after the first request, so this is
  the hot path;
- `blob-unknown`: the same blob from a client in no cloud's ranges
  (81.2.69.160), sent to the default mirror (`DEFAULT_AWS_BASE_URL`, the
  same bucket) after the same cached existence check.

Each archeio target runs on the real `archeio serve`, once per HTTP engine
named by `--http` (a comma-separated list; each engine gets its own
server, selected with `ARCHEIO_HTTP`; `default` leaves the server's
choice). The first engine listed is the one the floors bind. Targets
alternate within each round, and every figure is also given as a ratio
of the nginx run of the same round: on a noisy machine the ratio and the
CPU time per request are what survive. The CPU ratio is nginx's CPU time
per request over the target's: the throughput ratio each would reach with
a whole core, which does not flatter us when wrk itself is the limit.
With two CPUs, the servers run on CPU 0 and wrk (and the idle stand-in
bucket) on CPU 1.

`--scaling` measures the blob hot path with 1 and 2 worker processes
(`archeio serve --workers N`), unpinned, and compares CPU time per
request summed over the workers.

Floors (issue 13, first engine): blob-aws and blob-unknown >= 0.50 of
nginx, manifest >= 0.65 (median of the rounds' ratios).
Results go to benchmarks/results/throughput.{json,csv,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import (
    DEFAULT_ENGINE,
    EMBEDDED_RANGES,
    LOOPBACK,
    RESULTS,
    append_history,
    can_pin,
    cpu_seconds,
    engine_problem,
    engine_settings,
    floors_table,
    free_port,
    machine,
    machine_line,
    pinned,
    start_archeio,
    start_bucket,
    start_nginx,
    write_mirrors_file,
)

DIGEST = "sha256:" + "5" * 64
BLOB_PATH = f"/v2/pause/blobs/{DIGEST}"
MANIFEST_PATH = "/v2/pause/manifests/3.10"
AWS_CLIENT = "35.180.1.1, 127.0.0.1"  # AWS eu-west-3, behind one trusted proxy
UNKNOWN_CLIENT = "81.2.69.160, 127.0.0.1"  # a home connection: in no cloud's ranges
UPSTREAM = "https://us-central1-docker.pkg.dev/v2/k8s-artifacts-prod/images"

# Floors of issue 13: req/s as a share of nginx's, median of the rounds, first engine.
RATIO_FLOORS = {"blob-aws": 0.50, "blob-unknown": 0.50, "manifest": 0.65}
SCALING_FLOOR = 1.15

SERVER_CPUS = "0"
LOAD_CPUS = "1"


@dataclass
class Target:
    """One URL under load, on one server process."""

    name: str
    server: str
    engine: str | None  # the archeio HTTP engine; None for nginx
    port: int
    path: str
    forwarded: str
    expected_location: str | None  # checked before and after the load
    pid: int


@dataclass
class Run:
    round: int
    target: str
    server: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    bad_responses: int
    socket_errors: int
    cpu_seconds: float
    cpu_us_per_request: float
    ratio_to_nginx: float | None = None


# -- wrk -----------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> dict[str, float]:
    """requests, seconds, rps, p50/p99 (ms), bad responses and socket errors from wrk --latency."""
    found = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s)", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not found or not rps:
        raise RuntimeError(f"cannot read wrk output:\n{output}")
    percentiles = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+(?:us|ms|s))", output, re.M))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "requests": int(found[1]),
        "seconds": _ms(found[2] + found[3]) / 1e3,
        "rps": float(rps[1]),
        "p50_ms": _ms(percentiles["50"]),
        "p99_ms": _ms(percentiles["99"]),
        "bad_responses": int(bad[1]) if bad else 0,
        "socket_errors": sum(int(n) for n in errors.groups()) if errors else 0,
    }


def wrk(target: Target, seconds: float, connections: int, cpus: str | None) -> dict[str, float]:
    command = pinned(cpus, [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
        "-H", f"X-Forwarded-For: {target.forwarded}",
        f"http://{LOOPBACK}:{target.port}{target.path}",
    ])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return parse_wrk(done.stdout)


def measure(target: Target, round_: int, seconds: float, connections: int, cpus: str | None) -> Run:
    before = cpu_seconds(target.pid)
    figures = wrk(target, seconds, connections, cpus)
    used = cpu_seconds(target.pid) - before
    requests = int(figures["requests"])
    return Run(
        round=round_, target=target.name, server=target.server, requests=requests,
        seconds=figures["seconds"], rps=figures["rps"], p50_ms=figures["p50_ms"], p99_ms=figures["p99_ms"],
        bad_responses=int(figures["bad_responses"]), socket_errors=int(figures["socket_errors"]),
        cpu_seconds=round(used, 3), cpu_us_per_request=round(used / requests * 1e6, 2) if requests else 0.0,
    )


def check_redirect(target: Target) -> None:
    """The target answers what it should: a 307 to exactly the expected Location."""
    import http.client

    conn = http.client.HTTPConnection(LOOPBACK, target.port, timeout=5)
    try:
        conn.request("GET", target.path, headers={"X-Forwarded-For": target.forwarded})
        response = conn.getresponse()
        location = response.getheader("Location")
    finally:
        conn.close()
    if response.status != 307 or (target.expected_location and location != target.expected_location):
        raise RuntimeError(f"{target.name}: got {response.status} to {location!r}, "
                           f"expected 307 to {target.expected_location!r}")


# -- the run -------------------------------------------------------------

def summarise(runs: Sequence[Run], targets: Sequence[Target], baseline: str | None) -> list[dict[str, Any]]:
    """Median figures per target over the rounds."""
    rows: list[dict[str, Any]] = []
    for name in [t.name for t in targets]:
        mine = [r for r in runs if r.target == name]
        ratios = [r.ratio_to_nginx for r in mine if r.ratio_to_nginx is not None]
        rows.append({
            "target": name,
            "server": mine[0].server,
            "engine": next((t.engine for t in targets if t.name == name), None),
            "rounds": len(mine),
            "rps": round(statistics.median(r.rps for r in mine)),
            "p99_ms": round(statistics.median(r.p99_ms for r in mine), 2),
            "cpu_us_per_request": round(statistics.median(r.cpu_us_per_request for r in mine), 2),
            "ratio_to_nginx": round(statistics.median(ratios), 3) if ratios else None,
            "ratio_min": round(min(ratios), 3) if ratios else None,
            "ratio_max": round(max(ratios), 3) if ratios else None,
            "bad_responses": sum(r.bad_responses for r in mine),
            "socket_errors": sum(r.socket_errors for r in mine),
        })
    base = next((row for row in rows if row["target"] == baseline), None)
    for row in rows:
        # nginx's CPU per request over ours: throughput relative to nginx if
        # both had a whole core, whatever wrk or the neighbours allowed.
        row["cpu_ratio_to_nginx"] = (round(base["cpu_us_per_request"] / row["cpu_us_per_request"], 3)
                                     if base and row["cpu_us_per_request"] else None)
    return rows


def alternate(targets: Sequence[Target], rounds: int, seconds: int, connections: int,
              cpus: str | None, baseline: str | None, log: Callable[[str], None]) -> Iterator[Run]:
    """Each round runs every target once; ratios use the same round's baseline run."""
    for round_ in range(1, rounds + 1):
        base_rps = None
        for target in targets:
            run = measure(target, round_, seconds, connections, cpus)
            if target.name == baseline:
                base_rps = run.rps
            elif base_rps:
                run.ratio_to_nginx = round(run.rps / base_rps, 3)
            ratio = f"  {run.ratio_to_nginx:.3f} of nginx" if run.ratio_to_nginx else ""
            log(f"  round {round_} {target.name:<18} {run.rps:>9.0f} req/s  p99 {run.p99_ms:6.2f} ms  "
                f"cpu {run.cpu_us_per_request:6.1f} us/req{ratio}")
            yield run


def engine_label(engine: str, first: bool) -> str:
    """Target names carry the engine, except for the first one (the one the floors bind)."""
    return "" if first else f" [{engine}]"


def archeio_targets(engine: str, label: str, port: int, pid: int, mirror: str, default_mirror: str) -> list[Target]:
    server = f"archeio ({engine} engine)"
    return [
        Target(f"manifest{label}", server, engine, port, MANIFEST_PATH, AWS_CLIENT,
               f"{UPSTREAM}/pause/manifests/3.10", pid),
        Target(f"blob-aws{label}", server, engine, port, BLOB_PATH, AWS_CLIENT,
               f"{mirror}/containers/images/{DIGEST}", pid),
        Target(f"blob-unknown{label}", server, engine, port, BLOB_PATH, UNKNOWN_CLIENT,
               f"{default_mirror}/containers/images/{DIGEST}", pid),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=4, help="length of one wrk run (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of alternating runs (default 3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--http", default=DEFAULT_ENGINE,
                        help="HTTP engines to measure, comma-separated (ARCHEIO_HTTP, e.g. httptools,aiohttp); "
                        "the first is the one the floors bind (default: the server's default)")
    parser.add_argument("--scaling", action="store_true", help="also measure 1 and 2 worker processes")
    parser.add_argument("--scaling-rounds", type=int, default=6, help="rounds of the scaling runs (default 6)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and wrk to separate CPUs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory for the result files")
    args = parser.parse_args(argv)

    engines = [e.strip() for e in args.http.split(",") if e.strip()]
    if not shutil.which("wrk"):
        print("benchmarks/throughput: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    if problem := engine_problem(engines):
        print(f"benchmarks/throughput: {problem}", file=sys.stderr)
        return 2
    pin = can_pin() and not args.no_pin
    server_cpus, load_cpus = (SERVER_CPUS, LOAD_CPUS) if pin else (None, None)
    layout = (f"servers pinned to CPU {SERVER_CPUS}, wrk and the stand-in bucket to CPU {LOAD_CPUS} (taskset)"
              if pin else "not pinned")
    info = machine()
    print(f"machine: {machine_line(info)}")
    print(f"layout: {layout}")
    print(f"wrk -t1 -c{args.connections} -d{args.seconds}s --latency, {args.rounds} rounds, alternating; "
          f"engines: {', '.join(engines)}")

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="archeio-throughput-")))
        bucket_port = free_port()
        stack.enter_context(start_bucket(bucket_port, "--all-present", cpus=load_cpus,
                                         log=tmp / "bucket.log"))
        mirror, default_mirror = f"http://{LOOPBACK}:{bucket_port}/bucket", f"http://{LOOPBACK}:{bucket_port}/cdn"
        mirrors_file = write_mirrors_file(tmp / "mirrors.toml", {"AWS": {"eu-west-3": mirror}})
        env = {"ARCHEIO_MIRRORS_FILE": str(mirrors_file), "DEFAULT_AWS_BASE_URL": default_mirror,
               "ARCHEIO_LOG_LEVEL": "warning", **EMBEDDED_RANGES}
        in_mirror = f"{mirror}/containers/images/{DIGEST}"

        nginx_port = free_port()
        nginx = stack.enter_context(start_nginx(tmp, nginx_port, in_mirror, server_cpus))
        targets = [Target("nginx", "nginx", None, nginx_port, BLOB_PATH, AWS_CLIENT, in_mirror, nginx.pid)]
        for i, engine in enumerate(engines):
            port = free_port()
            server = stack.enter_context(start_archeio({**env, **engine_settings(engine)}, port, server_cpus,
                                                       log=tmp / f"archeio-{engine}.log"))
            targets += archeio_targets(engine, engine_label(engine, i == 0), port, server.pid, mirror,
                                       default_mirror)
        # The first blob request makes the HEAD that warms the cache; a short
        # wrk run per target warms connections and code paths before measuring.
        for target in targets:
            check_redirect(target)
            wrk(target, 1, args.connections, load_cpus)
        runs = list(alternate(targets, args.rounds, args.seconds, args.connections, load_cpus, "nginx",
                              print))
        for target in targets:
            check_redirect(target)  # still the same answer after the load
        scaling = measure_scaling(env, tmp, in_mirror, args, engines[0], print) if args.scaling else None

    summary = summarise(runs, targets, "nginx")
    result: dict[str, Any] = {
        "machine": info,
        "layout": layout,
        "wrk": f"-t1 -c{args.connections} -d{args.seconds}s --latency",
        "rounds": args.rounds,
        "engines": engines,
        "summary": summary,
        "scaling": scaling,
        "floors": floors(summary, scaling),
        "runs": [asdict(r) for r in runs],
    }
    write_results(args.results, result)
    append_history(args.results / "throughput-history.csv", history_row(result))
    print(render_markdown(result))
    return 0


def history_row(result: dict[str, Any]) -> dict[str, object]:
    """The run's headline figures: medians over the rounds, with their ranges."""
    rows = {row["target"]: row for row in result["summary"]}
    scaling = result["scaling"]
    info = result["machine"]
    found: dict[str, object] = {
        "date": info["date"], "code": info["archeio_commit"], "cpu_model": info.get("cpu_model"),
        "load_average": info["load_average_at_start"][0], "engine": result["engines"][0],
        "nginx_rps": rows["nginx"]["rps"], "nginx_cpu_us": rows["nginx"]["cpu_us_per_request"],
    }
    for row in result["summary"]:
        if row["target"] == "nginx":
            continue
        key = row["target"].replace("-", "_").replace(" [", "_").rstrip("]")
        found[f"{key}_ratio"] = row["ratio_to_nginx"]
        found[f"{key}_ratio_range"] = f"{row['ratio_min']}-{row['ratio_max']}"
        found[f"{key}_cpu_ratio"] = row["cpu_ratio_to_nginx"]
        found[f"{key}_cpu_us"] = row["cpu_us_per_request"]
    found["scaling_cpu_ratio"] = scaling["cpu_per_request_ratio_2_to_1"] if scaling else None
    return found


def measure_scaling(env: dict[str, str], tmp: Path, in_mirror: str, args: argparse.Namespace, engine: str,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """The blob hot path with 1 and 2 workers, alternating, unpinned (2 workers need both CPUs)."""
    log(f"scaling: archeio serve --workers 1 and --workers 2 (ARCHEIO_WORKERS), blob-aws, {engine} engine, "
        "not pinned")
    env = {**env, **engine_settings(engine)}
    targets = []
    with ExitStack() as stack:
        for workers in (1, 2):
            port = free_port()
            server = stack.enter_context(start_archeio({**env, "ARCHEIO_WORKERS": str(workers)}, port,
                                                       log=tmp / f"archeio-{workers}w.log"))
            targets.append(Target(f"{workers} worker{'s' * (workers > 1)}", f"archeio --workers {workers}",
                                  engine, port, BLOB_PATH, AWS_CLIENT, in_mirror, server.pid))
        for target in targets:
            check_redirect(target)
            # Each worker keeps its own cache: the warm-up run reaches them all.
            wrk(target, 1, args.connections, None)
        runs = list(alternate(targets, args.scaling_rounds, args.seconds, args.connections, None, None, log))
    one, two = summarise(runs, targets, None)
    # Each round's 2-worker figure over the same round's 1-worker one: the
    # neighbours' load changes between rounds more than within one.
    ratios = sorted(b.cpu_us_per_request / a.cpu_us_per_request for a, b in zip(runs[::2], runs[1::2], strict=True))
    return {"rows": [one, two], "cpu_per_request_ratio_2_to_1": round(statistics.median(ratios), 3),
            "ratio_per_round": [round(r, 3) for r in ratios], "floor": SCALING_FLOOR,
            "runs": [asdict(r) for r in runs]}


def floors(summary: list[dict[str, Any]], scaling: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each floor of the issues with its measured figure (the first engine's targets)."""
    rows = {row["target"]: row for row in summary}
    found = []
    for name, floor in RATIO_FLOORS.items():
        row = rows[name]
        found.append({
            "floor": f"{name} >= {floor:.2f} of nginx (req/s, median of {row['rounds']} rounds; "
                     f"{row['engine']} engine)",
            "measured": f"{row['ratio_to_nginx']} ({row['ratio_min']}-{row['ratio_max']}); CPU ratio "
                        f"{row['cpu_ratio_to_nginx']}",
            "met": (row["ratio_to_nginx"] or 0) >= floor,
        })
    if scaling is not None:
        ratio = scaling["cpu_per_request_ratio_2_to_1"]
        found.append({"floor": f"CPU per request, 2 workers <= {SCALING_FLOOR}x 1 worker",
                      "measured": ratio, "met": ratio <= SCALING_FLOOR})
    return found


def render_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Throughput ceiling (benchmarks/throughput)",
        "",
        f"Machine: {machine_line(result['machine'])}.  ",
        f"Layout: {result['layout']}. wrk {result['wrk']}, {result['rounds']} rounds, targets alternating; "
        "figures are medians over the rounds, ratios are to the nginx run of the same round. "
        "CPU ratio: nginx's CPU time per request divided by the target's (throughput relative "
        "to nginx if each had a whole core to itself).",
        "",
        "| target | server | req/s | ratio of nginx (min-max) | p99 ms | server CPU us/request | "
        "CPU ratio (nginx's CPU per request / ours) | per-core capacity req/s | bad responses |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["summary"]:
        ratio = ("1" if row["ratio_to_nginx"] is None
                 else f"{row['ratio_to_nginx']} ({row['ratio_min']}-{row['ratio_max']})")
        cpu = row["cpu_us_per_request"]
        lines.append(f"| {row['target']} | {row['server']} | {row['rps']} | {ratio} | {row['p99_ms']} | "
                     f"{cpu} | "
                     f"{row['cpu_ratio_to_nginx']} | {round(1e6 / cpu) if cpu else '-'} | "
                     f"{row['bad_responses'] + row['socket_errors']} |")
    scaling = result["scaling"]
    if scaling:
        lines += ["", "Multi-worker scaling (blob-aws; not pinned: wrk shares the same cores):", "",
                  "| workers | req/s | p99 ms | server CPU us/request (all workers) |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| {row['target']} | {row['rps']} | {row['p99_ms']} | {row['cpu_us_per_request']} |"
                  for row in scaling["rows"]]
        lines.append(f"\nCPU per request, 2 workers / 1 worker (median of rounds): "
                     f"{scaling['cpu_per_request_ratio_2_to_1']}; per round: {scaling.get('ratio_per_round')}")
    lines += ["", *floors_table(result["floors"])]
    return "\n".join(lines) + "\n"


def write_results(directory: Path, result: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (directory / "throughput.md").write_text(render_markdown(result))
    runs = result["runs"] + (result["scaling"]["runs"] if result["scaling"] else [])
    with open(directory / "throughput.csv", "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(runs[0]))
        writer.writeheader()
        writer.writerows(runs)


if __name__ == "__main__":
    sys.exit(main())
