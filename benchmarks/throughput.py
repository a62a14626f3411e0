"""Throughput ceiling of the hot paths against a near-limit nginx baseline (`benchmarks/throughput`).

One run measures, for each target, requests/s and p99 (wrk `-t1 -c64
--latency`) and the server's CPU time per request (its own utime + stime
from /proc, summed over its processes, read before and after each wrk
run):

- nginx: one worker answering every request with a fixed `return 307`,
  the near-limit baseline;
- archeio `manifest`: a manifest by tag, redirected upstream;
- archeio `blob-aws`: a blob from an AWS eu-west-3 client (X-Forwarded-For
  `35.180.1.1, 127.0.0.1`) whose mirror, a local stand-in bucket, holds it:
  the cache is warm after the first request, so this is the hot path;
- archeio `blob-gcp`: a blob from a Google Cloud client (35.220.26.1),
  redirected upstream without any existence check.

Targets alternate within each round, and every figure is also given as a
ratio of the nginx run of the same round: on a noisy machine the ratio
and the CPU time per request are what survive. With two CPUs, the servers
run on CPU 0 and wrk (and the idle stand-in bucket) on CPU 1.

`--engines` adds the same decision served by aiohttp's low-level server
(benchmarks/aiohttp_engine.py) and aiohttp answering a fixed 307: the
numbers behind the lean-protocol decision. `--scaling` measures the blob
hot path with 1 and 2 worker processes (`archeio serve --workers N`),
unpinned, and compares CPU time per request summed over the workers.

It also times `CloudIndex.lookup` on real addresses (ns per lookup).
Results go to benchmarks/results/throughput.{json,csv,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import (
    BENCHMARKS,
    LOOPBACK,
    RESULTS,
    Process,
    append_history,
    can_pin,
    cpu_seconds,
    floors_table,
    free_port,
    machine,
    machine_line,
    pinned,
    shared_ranges_dir,
    start_archeio,
    start_bucket,
    start_nginx,
    start_serving,
    write_mirrors_file,
)

DIGEST = "sha256:" + "5" * 64
BLOB_PATH = f"/v2/pause/blobs/{DIGEST}"
MANIFEST_PATH = "/v2/pause/manifests/3.10"
AWS_CLIENT = "35.180.1.1, 127.0.0.1"  # AWS eu-west-3, behind one trusted proxy
GOOGLE_CLIENT = "35.220.26.1, 127.0.0.1"  # Google Cloud
UPSTREAM = "https://us-central1-docker.pkg.dev/v2/k8s-artifacts-prod/images"

# Floors from the issues (server issue: blob path vs nginx; IP lookup).
BLOB_FLOOR = 0.30
LOOKUP_FLOOR_NS = 400
SCALING_FLOOR = 1.15

SERVER_CPUS = "0"
LOAD_CPUS = "1"


@dataclass
class Target:
    """One URL under load, on one server process."""

    name: str
    server: str
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


# -- servers -------------------------------------------------------------

def start_engine(port: int, env: dict[str, str], cpus: str | None, tmp: Path,
                 fixed: str | None = None) -> Process:
    """benchmarks/aiohttp_engine.py: the decision on aiohttp, or (`fixed`) a constant 307."""
    command = [sys.executable, str(BENCHMARKS / "aiohttp_engine.py"), "--port", str(port)]
    if fixed:
        command += ["--fixed", fixed]
    name = "aiohttp-fixed" if fixed else "aiohttp-engine"
    return start_serving(name, pinned(cpus, command), port, {**os.environ, **env}, tmp / f"{name}.log")


# -- IP lookup -----------------------------------------------------------

def lookup_ns() -> dict[str, object]:
    """Nanoseconds per CloudIndex.lookup on real addresses, best of 15 repeats."""
    from iprange import load_index

    source = shared_ranges_dir()
    index = load_index(source)
    addresses = {
        "aws-v4 (35.180.1.1)": "35.180.1.1",
        "gcp-v4 (35.220.26.1)": "35.220.26.1",
        "none-v4 (192.168.0.1)": "192.168.0.1",
        "aws-v6 (2a05:d012::1)": "2a05:d012::1",
        "none-v6 (2001:db8::1)": "2001:db8::1",
    }
    lookup = index.lookup
    per_address: dict[str, float] = {}
    for label, address in addresses.items():
        # Many short repeats, best one kept: on a shared machine the best
        # is the run nobody interrupted.
        number = 50_000
        best = min(timeit.repeat(lambda a=address: lookup(a), number=number, repeat=15))
        per_address[label] = round(best / number * 1e9, 1)
    return {
        "ranges": str(source) if source else "embedded",
        "ns_per_lookup": per_address,
        "worst_ns": max(per_address.values()),
        "floor_ns": LOOKUP_FLOOR_NS,
    }


# -- the run -------------------------------------------------------------

def summarise(runs: Sequence[Run], names: Sequence[str], baseline: str | None) -> list[dict[str, Any]]:
    """Median figures per target over the rounds."""
    rows: list[dict[str, Any]] = []
    for name in names:
        mine = [r for r in runs if r.target == name]
        ratios = [r.ratio_to_nginx for r in mine if r.ratio_to_nginx is not None]
        rows.append({
            "target": name,
            "server": mine[0].server,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=4, help="length of one wrk run (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of alternating runs (default 3)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument("--engines", action="store_true",
                        help="also measure the decision on aiohttp's low-level server, and a fixed 307 on it")
    parser.add_argument("--scaling", action="store_true", help="also measure 1 and 2 worker processes")
    parser.add_argument("--scaling-rounds", type=int, default=6, help="rounds of the scaling runs (default 6)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and wrk to separate CPUs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory for the result files")
    args = parser.parse_args(argv)

    if not shutil.which("wrk"):
        print("benchmarks/throughput: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    pin = can_pin() and not args.no_pin
    server_cpus, load_cpus = (SERVER_CPUS, LOAD_CPUS) if pin else (None, None)
    layout = (f"servers pinned to CPU {SERVER_CPUS}, wrk and the stand-in bucket to CPU {LOAD_CPUS} (taskset)"
              if pin else "not pinned")
    info = machine()
    print(f"machine: {machine_line(info)}")
    print(f"layout: {layout}")
    print(f"wrk -t1 -c{args.connections} -d{args.seconds}s --latency, {args.rounds} rounds, alternating")

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="archeio-throughput-")))
        bucket_port = free_port()
        stack.enter_context(start_bucket(bucket_port, "--all-present", cpus=load_cpus,
                                         log=tmp / "bucket.log"))
        mirror = f"http://{LOOPBACK}:{bucket_port}/bucket"
        mirrors_file = write_mirrors_file(tmp / "mirrors.toml", {"AWS": {"eu-west-3": mirror}})
        env = {"ARCHEIO_MIRRORS_FILE": str(mirrors_file), "ARCHEIO_LOG_LEVEL": "warning",
               "ARCHEIO_RANGES_DIR": str(shared_ranges_dir() or "")}
        in_mirror = f"{mirror}/containers/images/{DIGEST}"

        archeio_port, nginx_port = free_port(), free_port()
        archeio = stack.enter_context(start_archeio(env, archeio_port, server_cpus, log=tmp / "archeio.log"))
        nginx = stack.enter_context(start_nginx(tmp, nginx_port, in_mirror, server_cpus))
        targets = [
            Target("nginx", "nginx", nginx_port, BLOB_PATH, AWS_CLIENT, in_mirror, nginx.pid),
            Target("manifest", "archeio", archeio_port, MANIFEST_PATH, AWS_CLIENT,
                   f"{UPSTREAM}/pause/manifests/3.10", archeio.pid),
            Target("blob-aws", "archeio", archeio_port, BLOB_PATH, AWS_CLIENT, in_mirror, archeio.pid),
            Target("blob-gcp", "archeio", archeio_port, BLOB_PATH, GOOGLE_CLIENT,
                   f"{UPSTREAM}/pause/blobs/{DIGEST}", archeio.pid),
        ]
        if args.engines:
            engine_port, fixed_port = free_port(), free_port()
            engine = stack.enter_context(start_engine(engine_port, env, server_cpus, tmp))
            fixed = stack.enter_context(start_engine(fixed_port, env, server_cpus, tmp, fixed=in_mirror))
            targets += [
                Target("aiohttp-blob-aws", "aiohttp web.Server, same decision", engine_port, BLOB_PATH,
                       AWS_CLIENT, in_mirror, engine.pid),
                Target("aiohttp-fixed-307", "aiohttp web.Server, constant 307", fixed_port, BLOB_PATH,
                       AWS_CLIENT, in_mirror, fixed.pid),
            ]
        # The first blob request makes the HEAD that warms the cache; a short
        # wrk run per target warms connections and code paths before measuring.
        for target in targets:
            check_redirect(target)
            wrk(target, 1, args.connections, load_cpus)
        runs = list(alternate(targets, args.rounds, args.seconds, args.connections, load_cpus, "nginx",
                              print))
        for target in targets:
            check_redirect(target)  # still the same answer after the load
        scaling = measure_scaling(env, tmp, in_mirror, args, print) if args.scaling else None

    lookups = lookup_ns()
    summary = summarise(runs, [t.name for t in targets], "nginx")
    result: dict[str, Any] = {
        "machine": info,
        "layout": layout,
        "wrk": f"-t1 -c{args.connections} -d{args.seconds}s --latency",
        "rounds": args.rounds,
        "summary": summary,
        "ip_lookup": lookups,
        "scaling": scaling,
        "floors": floors(summary, lookups, scaling),
        "runs": [asdict(r) for r in runs],
    }
    write_results(args.results, result)
    append_history(args.results / "throughput-history.csv", history_row(result))
    print(render_markdown(result))
    return 0


def history_row(result: dict[str, Any]) -> dict[str, object]:
    rows = {row["target"]: row for row in result["summary"]}
    scaling = result["scaling"]
    return {
        "date": result["machine"]["date"], "code": result["machine"]["archeio_commit"],
        "load_average": result["machine"]["load_average_at_start"][0],
        "nginx_rps": rows["nginx"]["rps"], "nginx_cpu_us": rows["nginx"]["cpu_us_per_request"],
        "blob_aws_ratio": rows["blob-aws"]["ratio_to_nginx"], "blob_aws_cpu_us": rows["blob-aws"]["cpu_us_per_request"],
        "manifest_ratio": rows["manifest"]["ratio_to_nginx"], "blob_gcp_ratio": rows["blob-gcp"]["ratio_to_nginx"],
        "aiohttp_blob_ratio": rows.get("aiohttp-blob-aws", {}).get("ratio_to_nginx"),
        "scaling_cpu_ratio": scaling["cpu_per_request_ratio_2_to_1"] if scaling else None,
        "lookup_worst_ns": result["ip_lookup"]["worst_ns"],
    }


def measure_scaling(env: dict[str, str], tmp: Path, in_mirror: str, args: argparse.Namespace,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """The blob hot path with 1 and 2 workers, alternating, unpinned (2 workers need both CPUs)."""
    log("scaling: archeio serve --workers 1 and --workers 2 (ARCHEIO_WORKERS), blob-aws, not pinned")
    targets = []
    with ExitStack() as stack:
        for workers in (1, 2):
            port = free_port()
            server = stack.enter_context(start_archeio({**env, "ARCHEIO_WORKERS": str(workers)}, port,
                                                       log=tmp / f"archeio-{workers}w.log"))
            targets.append(Target(f"{workers} worker{'s' * (workers > 1)}", f"archeio --workers {workers}",
                                  port, BLOB_PATH, AWS_CLIENT, in_mirror, server.pid))
        for target in targets:
            check_redirect(target)
            # Each worker keeps its own cache: the warm-up run reaches them all.
            wrk(target, 1, args.connections, None)
        runs = list(alternate(targets, args.scaling_rounds, args.seconds, args.connections, None, None, log))
    one, two = summarise(runs, [t.name for t in targets], None)
    # Each round's 2-worker figure over the same round's 1-worker one: the
    # neighbours' load changes between rounds more than within one.
    ratios = sorted(b.cpu_us_per_request / a.cpu_us_per_request for a, b in zip(runs[::2], runs[1::2], strict=True))
    return {"rows": [one, two], "cpu_per_request_ratio_2_to_1": round(statistics.median(ratios), 3),
            "ratio_per_round": [round(r, 3) for r in ratios], "floor": SCALING_FLOOR,
            "runs": [asdict(r) for r in runs]}


def floors(summary: list[dict[str, Any]], lookups: dict[str, Any],
           scaling: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each floor of the issues with its measured figure."""
    blob = next(r for r in summary if r["target"] == "blob-aws")
    found = [
        {"floor": f"blob hot path >= {BLOB_FLOOR} of nginx (req/s)", "measured": blob["ratio_to_nginx"],
         "met": (blob["ratio_to_nginx"] or 0) >= BLOB_FLOOR},
        {"floor": f"IP lookup <= {LOOKUP_FLOOR_NS} ns (worst address)", "measured": lookups["worst_ns"],
         "met": lookups["worst_ns"] <= LOOKUP_FLOOR_NS},
    ]
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
        "CPU ratio of nginx | per-core capacity req/s | bad responses |",
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
    lookups = result["ip_lookup"]
    lines += ["", f"IP lookup (`CloudIndex.lookup`, ranges: {lookups['ranges']}), ns per lookup:", ""]
    lines += [f"- {label}: {ns}" for label, ns in lookups["ns_per_lookup"].items()]
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
