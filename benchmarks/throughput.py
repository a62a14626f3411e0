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

`--close` runs every target a second time with `Connection: close` on
every request (wrk `-H 'Connection: close'`: a new connection a request,
and the server's closing of it), reported separately as `<target>
(close)`, its ratios to nginx in the same mode.

Optional references, each a target of its own (its rows appear only when
it runs), pinned like the servers:

- `--bare-aiohttp`: aiohttp's bare `web.Server` on uvloop answering a
  fixed 307 (bare_aiohttp.py): the ceiling of the aiohttp engine, whose
  ratio to it is reported per round beside the nginx ratio;
- `--go PATH` (or `$ARCHEIO_GO`): the Go original (upstream's
  `cmd/archeio`, built by the user) on the manifest and unknown-client
  blob paths, its `DEFAULT_AWS_BASE_URL` on the stand-in bucket. It has
  no AWS-client blob target: its regional mirrors are built-in S3 URLs.

`--tree PATH` serves another checkout's archeio (the code before a
change) with this environment's interpreter and dependencies.

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
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from harness import (
    BENCHMARKS,
    DEFAULT_ENGINE,
    EMBEDDED_RANGES,
    LOOPBACK,
    RESULTS,
    add_tree_argument,
    append_history,
    can_pin,
    cpu_seconds,
    engine_problem,
    engine_settings,
    find_executable,
    floors_table,
    free_port,
    machine,
    machine_line,
    pinned,
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
UNKNOWN_CLIENT = "81.2.69.160, 127.0.0.1"  # a home connection: in no cloud's ranges
UPSTREAM = "https://us-central1-docker.pkg.dev/v2/k8s-artifacts-prod/images"

# Floors of issue 13: req/s as a share of nginx's, median of the rounds, first engine.
RATIO_FLOORS = {"blob-aws": 0.50, "blob-unknown": 0.50, "manifest": 0.65}
SCALING_FLOOR = 1.15

SERVER_CPUS = "0"
LOAD_CPUS = "1"


CLOSE = " (close)"  # the name's suffix of a target measured with `Connection: close`
BARE = "bare-aiohttp"


@dataclass
class Target:
    """One URL under load, on one server process."""

    name: str
    server: str
    engine: str | None  # the archeio HTTP engine; None for nginx and the other references
    port: int
    path: str
    forwarded: str
    expected_location: str | None  # checked before and after the load
    pid: int
    close: bool = False  # every request with `Connection: close`
    nginx: str | None = None  # the target whose same-round req/s the ratio is taken to
    bare: str | None = None  # the bare aiohttp target, when measured


@dataclass
class Rig:
    """The stand-in bucket and the settings that point the mirrors at it."""

    env: dict[str, str]
    mirror: str  # the eu-west-3 mirror, holding the blob
    default_mirror: str  # DEFAULT_AWS_BASE_URL, the same bucket

    @property
    def in_mirror(self) -> str:
        return f"{self.mirror}/containers/images/{DIGEST}"


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
    ratio_to_bare: float | None = None


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
    close = ["-H", "Connection: close"] if target.close else []
    command = pinned(cpus, [
        "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency",
        "-H", f"X-Forwarded-For: {target.forwarded}", *close,
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


def check_redirect(target: Target, timeout: float = 5.0) -> None:
    """The target answers what it should: a 307 to exactly the expected Location."""
    import http.client

    conn = http.client.HTTPConnection(LOOPBACK, target.port, timeout=timeout)
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

def _median_range(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    return round(statistics.median(values), 3), round(min(values), 3), round(max(values), 3)


def summarise(runs: Sequence[Run], targets: Sequence[Target]) -> list[dict[str, Any]]:
    """Median figures per target over the rounds."""
    rows: list[dict[str, Any]] = []
    for target in targets:
        mine = [r for r in runs if r.target == target.name]
        ratio, ratio_min, ratio_max = _median_range([r.ratio_to_nginx for r in mine if r.ratio_to_nginx])
        bare, bare_min, bare_max = _median_range([r.ratio_to_bare for r in mine if r.ratio_to_bare])
        rows.append({
            "target": target.name,
            "server": mine[0].server,
            "engine": target.engine,
            "connection": "close" if target.close else "keep-alive",
            "rounds": len(mine),
            "rps": round(statistics.median(r.rps for r in mine)),
            "p99_ms": round(statistics.median(r.p99_ms for r in mine), 2),
            "cpu_us_per_request": round(statistics.median(r.cpu_us_per_request for r in mine), 2),
            "ratio_to_nginx": ratio, "ratio_min": ratio_min, "ratio_max": ratio_max,
            "ratio_to_bare_aiohttp": bare, "bare_ratio_min": bare_min, "bare_ratio_max": bare_max,
            "bad_responses": sum(r.bad_responses for r in mine),
            "socket_errors": sum(r.socket_errors for r in mine),
        })
    by_name = {row["target"]: row for row in rows}
    for target, row in zip(targets, rows, strict=True):
        # nginx's CPU per request over ours: throughput relative to nginx if
        # both had a whole core, whatever wrk or the neighbours allowed.
        reference = target.nginx or (target.name if target.server == "nginx" else None)
        base = by_name.get(reference) if reference else None
        row["cpu_ratio_to_nginx"] = (round(base["cpu_us_per_request"] / row["cpu_us_per_request"], 3)
                                     if base and row["cpu_us_per_request"] else None)
    return rows


def alternate(targets: Sequence[Target], rounds: int, seconds: int, connections: int,
              cpus: str | None, log: Callable[[str], None]) -> Iterator[Run]:
    """Each round runs every target once; ratios use the same round's runs of its references.

    References (nginx, the bare aiohttp server) come first in `targets`.
    """
    for round_ in range(1, rounds + 1):
        round_rps: dict[str, float] = {}
        for target in targets:
            run = measure(target, round_, seconds, connections, cpus)
            round_rps[target.name] = run.rps
            if target.nginx in round_rps:
                run.ratio_to_nginx = round(run.rps / round_rps[target.nginx], 3)
            if target.bare in round_rps:
                run.ratio_to_bare = round(run.rps / round_rps[target.bare], 3)
            ratio = f"  {run.ratio_to_nginx:.3f} of nginx" if run.ratio_to_nginx else ""
            bare = f"  {run.ratio_to_bare:.3f} of bare aiohttp" if run.ratio_to_bare else ""
            log(f"  round {round_} {target.name:<26} {run.rps:>9.0f} req/s  p99 {run.p99_ms:6.2f} ms  "
                f"cpu {run.cpu_us_per_request:6.1f} us/req{ratio}{bare}")
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


def start_rig(stack: ExitStack, tmp: Path, cpus: str | None) -> Rig:
    """The stand-in bucket holding every blob, the eu-west-3 mirror and the default on it."""
    bucket_port = free_port()
    stack.enter_context(start_bucket(bucket_port, "--all-present", cpus=cpus, log=tmp / "bucket.log"))
    mirror, default_mirror = f"http://{LOOPBACK}:{bucket_port}/bucket", f"http://{LOOPBACK}:{bucket_port}/cdn"
    mirrors_file = write_mirrors_file(tmp / "mirrors.toml", {"AWS": {"eu-west-3": mirror}})
    env = {"ARCHEIO_MIRRORS_FILE": str(mirrors_file), "DEFAULT_AWS_BASE_URL": default_mirror,
           "ARCHEIO_LOG_LEVEL": "warning", **EMBEDDED_RANGES}
    return Rig(env, mirror, default_mirror)


def start_bare_aiohttp(stack: ExitStack, tmp: Path, location: str, cpus: str | None) -> Target:
    """bare_aiohttp.py: aiohttp's `web.Server` answering a fixed 307, the aiohttp engine's ceiling."""
    port = free_port()
    command = [sys.executable, str(BENCHMARKS / "bare_aiohttp.py"), "--port", str(port), "--location", location]
    server = stack.enter_context(start_serving(BARE, pinned(cpus, command), port, log=tmp / "bare-aiohttp.log"))
    return Target(BARE, "aiohttp web.Server, fixed 307", None, port, BLOB_PATH, AWS_CLIENT, location, server.pid)


def start_go(stack: ExitStack, tmp: Path, binary: str, rig: Rig, cpus: str | None) -> list[Target]:
    """The Go original on the manifest and unknown-client blob paths, its default mirror on the bucket.

    It binds the port given in $PORT; a build of upstream listens on every
    address (`:PORT`), so build it to bind loopback (benchmarks/README.md).
    """
    port = free_port()
    env = {**os.environ, "PORT": str(port), "DEFAULT_AWS_BASE_URL": rig.default_mirror}
    server = stack.enter_context(start_serving("Go original", pinned(cpus, [binary]), port, env,
                                               log=tmp / "archeio-go.log"))
    name = "archeio (Go original)"
    return [
        Target("manifest [go]", name, None, port, MANIFEST_PATH, AWS_CLIENT, f"{UPSTREAM}/pause/manifests/3.10",
               server.pid),
        Target("blob-unknown [go]", name, None, port, BLOB_PATH, UNKNOWN_CLIENT,
               f"{rig.default_mirror}/containers/images/{DIGEST}", server.pid),
    ]


def with_references(targets: Sequence[Target], close: bool) -> list[Target]:
    """The targets in one connection mode, each told its nginx and bare aiohttp references."""
    suffix = CLOSE if close else ""
    names = {t.name for t in targets}
    bare = BARE + suffix if BARE in names else None
    found = []
    for target in targets:
        reference = target.name in ("nginx", BARE)
        found.append(replace(target, name=target.name + suffix, close=close,
                             nginx=None if target.name == "nginx" else "nginx" + suffix,
                             bare=None if reference else bare))
    return found


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
    parser.add_argument("--close", action="store_true",
                        help="also measure every target with `Connection: close` on every request")
    parser.add_argument("--bare-aiohttp", action="store_true",
                        help="also measure aiohttp's bare web.Server answering a fixed 307 (bare_aiohttp.py)")
    parser.add_argument("--go", metavar="PATH",
                        help="also measure the Go original, this binary (default: $ARCHEIO_GO when set)")
    add_tree_argument(parser)
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and wrk to separate CPUs")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory for the result files")
    args = parser.parse_args(argv)

    engines = [e.strip() for e in args.http.split(",") if e.strip()]
    if not shutil.which("wrk"):
        print("benchmarks/throughput: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    if problem := engine_problem(engines, args.tree):
        print(f"benchmarks/throughput: {problem}", file=sys.stderr)
        return 2
    go = find_executable(args.go, "ARCHEIO_GO")
    if (args.go or os.environ.get("ARCHEIO_GO")) and not go:
        print(f"benchmarks/throughput: the Go original {args.go or os.environ['ARCHEIO_GO']!r} is not an "
              "executable file", file=sys.stderr)
        return 2
    pin = can_pin() and not args.no_pin
    server_cpus, load_cpus = (SERVER_CPUS, LOAD_CPUS) if pin else (None, None)
    layout = (f"servers pinned to CPU {SERVER_CPUS}, wrk and the stand-in bucket to CPU {LOAD_CPUS} (taskset)"
              if pin else "not pinned")
    info = machine(args.tree)
    print(f"machine: {machine_line(info)}")
    print(f"layout: {layout}")
    print(f"wrk -t1 -c{args.connections} -d{args.seconds}s --latency, {args.rounds} rounds, alternating; "
          f"engines: {', '.join(engines)}" + ("; keep-alive, then Connection: close" if args.close else ""))

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="archeio-throughput-")))
        rig = start_rig(stack, tmp, load_cpus)
        nginx_port = free_port()
        nginx = stack.enter_context(start_nginx(tmp, nginx_port, rig.in_mirror, server_cpus))
        targets = [Target("nginx", "nginx", None, nginx_port, BLOB_PATH, AWS_CLIENT, rig.in_mirror, nginx.pid)]
        if args.bare_aiohttp:
            targets.append(start_bare_aiohttp(stack, tmp, rig.in_mirror, server_cpus))
        if go:
            targets += start_go(stack, tmp, go, rig, server_cpus)
        for i, engine in enumerate(engines):
            port = free_port()
            server = stack.enter_context(start_archeio({**rig.env, **engine_settings(engine)}, port, server_cpus,
                                                       log=tmp / f"archeio-{engine}.log", tree=args.tree))
            targets += archeio_targets(engine, engine_label(engine, i == 0), port, server.pid, rig.mirror,
                                       rig.default_mirror)
        targets = with_references(targets, close=False) + (with_references(targets, close=True)
                                                           if args.close else [])
        # The first blob request makes the HEAD that warms the cache; a short
        # wrk run per target warms connections and code paths before measuring.
        for target in targets:
            check_redirect(target)
            wrk(target, 1, args.connections, load_cpus)
        # Each mode's rounds alternate its own targets: a ratio compares runs
        # seconds apart, never a keep-alive run with a close one.
        runs = [run for close in (False, True) for run in
                alternate([t for t in targets if t.close == close], args.rounds, args.seconds, args.connections,
                          load_cpus, print)]
        for target in targets:
            check_redirect(target)  # still the same answer after the load
        scaling = (measure_scaling(rig.env, tmp, rig.in_mirror, args, engines[0], print)
                   if args.scaling else None)

    summary = summarise(runs, targets)
    result: dict[str, Any] = {
        "machine": info,
        "layout": layout,
        "wrk": f"-t1 -c{args.connections} -d{args.seconds}s --latency",
        "rounds": args.rounds,
        "engines": engines,
        "tree": str(args.tree.resolve()) if args.tree else None,
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
        # "blob-aws [aiohttp] (close)" -> blob_aws_aiohttp_close
        key = re.sub(r"[^a-z0-9]+", "_", row["target"]).strip("_")
        found[f"{key}_ratio"] = row["ratio_to_nginx"]
        found[f"{key}_ratio_range"] = f"{row['ratio_min']}-{row['ratio_max']}"
        found[f"{key}_cpu_ratio"] = row["cpu_ratio_to_nginx"]
        found[f"{key}_cpu_us"] = row["cpu_us_per_request"]
        if row.get("ratio_to_bare_aiohttp") is not None:
            found[f"{key}_bare_ratio"] = row["ratio_to_bare_aiohttp"]
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
                                                       log=tmp / f"archeio-{workers}w.log", tree=args.tree))
            targets.append(Target(f"{workers} worker{'s' * (workers > 1)}", f"archeio --workers {workers}",
                                  engine, port, BLOB_PATH, AWS_CLIENT, in_mirror, server.pid))
        for target in targets:
            check_redirect(target)
            # Each worker keeps its own cache: the warm-up run reaches them all.
            wrk(target, 1, args.connections, None)
        runs = list(alternate(targets, args.scaling_rounds, args.seconds, args.connections, None, log))
    one, two = summarise(runs, targets)
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
        "to nginx if each had a whole core to itself). Targets named `(close)` sent `Connection: close` "
        "on every request (a new connection each); their ratios are to `nginx (close)`.",
        "",
    ]
    # The bare aiohttp column only when that server was measured.
    bare = any(row.get("ratio_to_bare_aiohttp") is not None for row in result["summary"])
    lines += [
        "| target | server | req/s | ratio of nginx (min-max) | " + ("ratio of bare aiohttp (min-max) | " * bare)
        + "p99 ms | server CPU us/request | CPU ratio (nginx's CPU per request / ours) | per-core capacity req/s | "
        "bad responses |",
        "| --- | --- | ---: | ---: | " + "---: | " * bare + "---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["summary"]:
        ratio = ("1" if row["ratio_to_nginx"] is None
                 else f"{row['ratio_to_nginx']} ({row['ratio_min']}-{row['ratio_max']})")
        of_bare = ("-" if row.get("ratio_to_bare_aiohttp") is None else
                   f"{row['ratio_to_bare_aiohttp']} ({row['bare_ratio_min']}-{row['bare_ratio_max']})")
        cpu = row["cpu_us_per_request"]
        lines.append(f"| {row['target']} | {row['server']} | {row['rps']} | {ratio} | "
                     + f"{of_bare} | " * bare + f"{row['p99_ms']} | {cpu} | "
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
