"""Cold start: from exec to the first answers, median of 10 starts (`benchmarks/cold-start`).

Each start execs the real `archeio serve` (the default HTTP engine, one
worker, the embedded range data with its compiled index cache already
built, pinned to CPU 0) and times, from just before the exec:

- `/v2/`: the first 200 on `GET /v2/` (floor 300 ms, issue 13);
- `blob`: the first answer to a blob request that needs an existence
  check: a client in no cloud's ranges, whose blobs go to the default
  mirror (`DEFAULT_AWS_BASE_URL`, a local stand-in bucket) once a HEAD
  there finds them. The answer must be the 307 to that mirror, and the
  bucket must have counted the HEAD;
- `/readyz`: the first 200 on the admin port.

Three pollers (threads of this process, on CPU 1) start with the exec and
ask again every millisecond until they get their answer, so each figure
is when the server could first answer it, not when another poller
finished. The first start builds the compiled index cache
(`ARCHEIO_CACHE_DIR`, a temporary directory) and is reported apart.

Floors: `/v2/` <= 300 ms. The blob answer and `/readyz` must not be slower
than before the start-up work: `--save-baseline` records this run's
medians in results/cold-start-baseline.json (run it on the code before
the change); later runs compare against it, with 10% for noise.
Results: results/cold-start.{json,md}, a line in cold-start-history.csv.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from harness import (
    LOOPBACK,
    RESULTS,
    SERVER_CWD,
    Process,
    append_history,
    archeio_command,
    bucket_counts,
    can_pin,
    floors_table,
    free_port,
    machine,
    machine_line,
    pinned,
    start_bucket,
    tree_env,
)

V2_FLOOR_MS = 300.0
BASELINE_NOISE = 1.10
DIGEST = "sha256:" + "7" * 64
BLOB_PATH = f"/v2/pause/blobs/{DIGEST}"
UNKNOWN_CLIENT = "81.2.69.160, 127.0.0.1"  # in no cloud's ranges: the default mirror, after a HEAD
POLL_SECONDS = 0.001
START_TIMEOUT = 30.0
FIGURES = ("v2_ms", "blob_ms", "readyz_ms")


def first_answer(port: int, path: str, headers: dict[str, str], started: float,
                 until: float) -> tuple[float, int, str | None]:
    """Poll until something answers `path`: (ms since `started`, status, Location)."""
    while time.perf_counter() < until:
        conn = http.client.HTTPConnection(LOOPBACK, port, timeout=5)
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            if path != "/readyz" or response.status == 200:
                return (time.perf_counter() - started) * 1000, response.status, response.getheader("Location")
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(POLL_SECONDS)
    raise RuntimeError(f"no answer on port {port} {path} within {START_TIMEOUT} s")


def one_start(env: dict[str, str], cpus: str | None, log: Path, expected_blob: str,
              tree: Path | None = None) -> dict[str, float]:
    port, admin_port = free_port(), free_port()
    full_env = {**env, "PORT": str(port), "ARCHEIO_ADMIN_PORT": str(admin_port)}
    answers: dict[str, tuple[float, int, str | None]] = {}
    errors: list[BaseException] = []

    def poll(name: str, target_port: int, path: str, headers: dict[str, str]) -> None:
        try:
            answers[name] = first_answer(target_port, path, headers, started, started + START_TIMEOUT)
        except BaseException as exc:  # reported below, after the server is stopped
            errors.append(exc)

    pollers = [
        threading.Thread(target=poll, args=("v2_ms", port, "/v2/", {})),
        threading.Thread(target=poll, args=("blob_ms", port, BLOB_PATH, {"X-Forwarded-For": UNKNOWN_CLIENT})),
        threading.Thread(target=poll, args=("readyz_ms", admin_port, "/readyz", {})),
    ]
    started = time.perf_counter()
    server = Process("archeio", pinned(cpus, archeio_command(tree)), {**full_env, **tree_env(tree)}, log=log,
                     cwd=SERVER_CWD)
    try:
        for poller in pollers:
            poller.start()
        for poller in pollers:
            poller.join()
    finally:
        server.stop()
    if errors:
        raise RuntimeError(f"start failed: {errors[0]}; see {log}")
    _, status, location = answers["blob_ms"]
    if status != 307 or location != expected_blob:
        raise RuntimeError(f"the blob answer was {status} to {location!r}, not the mirror's {expected_blob!r}")
    if answers["v2_ms"][1] != 200:
        raise RuntimeError(f"/v2/ answered {answers['v2_ms'][1]}")
    return {name: round(answers[name][0], 1) for name in FIGURES}


def summarise(starts: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {name: {"median": round(statistics.median(s[name] for s in starts), 1),
                   "min": min(s[name] for s in starts), "max": max(s[name] for s in starts)} for name in FIGURES}


def floors(summary: dict[str, dict[str, float]], baseline: dict[str, Any] | None,
           cpu_model: str) -> list[dict[str, Any]]:
    def measured(name: str) -> str:
        figure = summary[name]
        return f"{figure['median']} ms ({figure['min']}-{figure['max']})"

    found = [{"floor": f"exec to first 200 on /v2/ <= {V2_FLOOR_MS:g} ms (median)", "measured": measured("v2_ms"),
              "met": summary["v2_ms"]["median"] <= V2_FLOOR_MS}]
    for name, what in (("blob_ms", "first blob answer needing a HEAD"), ("readyz_ms", "first 200 on /readyz")):
        if baseline is None:
            found.append({"floor": f"{what}: not slower than the baseline", "measured": measured(name),
                          "met": None, "note": "no baseline recorded (--save-baseline on the old code)"})
            continue
        before = baseline["summary"][name]["median"]
        same_machine = baseline["machine"]["cpu_model"] == cpu_model
        found.append({
            "floor": f"{what} <= baseline {before} ms + {BASELINE_NOISE - 1:.0%} (code "
                     f"{baseline['machine']['archeio_commit']}{'' if same_machine else ', ANOTHER CPU MODEL'})",
            "measured": measured(name), "met": summary[name]["median"] <= before * BASELINE_NOISE,
        })
    return found


def render_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Cold start (benchmarks/cold-start)",
        "",
        f"Machine: {machine_line(result['machine'])}.  ",
        f"`archeio serve`, default HTTP engine, embedded range data, compiled index cache warm, {result['layout']}. "
        f"Median of {len(result['starts'])} starts, min-max; ms from just before the exec.",
        "",
        "| figure | median | min | max |",
        "| --- | ---: | ---: | ---: |",
    ]
    labels = {"v2_ms": "first 200 on /v2/", "blob_ms": "first blob answer needing a HEAD",
              "readyz_ms": "first 200 on /readyz (admin port)"}
    for name in FIGURES:
        figure = result["summary"][name]
        lines.append(f"| {labels[name]} | {figure['median']} | {figure['min']} | {figure['max']} |")
    if "against" in result:
        other = result["against"]
        lines += ["", f"Against `{other['tree']}` (its starts alternating with these, same interpreter):", "",
                  "| figure | median there | min | max | ratio of medians (this / there) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name in FIGURES:
            figure = other["summary"][name]
            lines.append(f"| {labels[name]} | {figure['median']} | {figure['min']} | {figure['max']} | "
                         f"{other['ratio'][name]} |")
    lines += ["", f"First start, compiled index cache cold: {result['cache_cold_start']}.", "",
              *floors_table(result["floors"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/cold-start", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=10, help="measured starts (default 10)")
    parser.add_argument("--save-baseline", action="store_true",
                        help="record this run as the baseline the blob and /readyz floors compare with")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server to CPU 0")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory for the result files")
    parser.add_argument("--against", type=Path, metavar="TREE",
                        help="another checkout (the code before a change): its starts alternate with these, "
                        "with the same interpreter, and the ratio of the medians is reported")
    args = parser.parse_args(argv)

    pin = can_pin() and not args.no_pin
    server_cpus = "0" if pin else None
    layout = "server pinned to CPU 0, pollers and the stand-in bucket on CPU 1" if pin else "not pinned"
    if pin:
        os.sched_setaffinity(0, {1})
    info = machine()
    print(f"machine: {machine_line(info)}\nlayout: {layout}")
    with tempfile.TemporaryDirectory(prefix="archeio-cold-start-") as tmp_name:
        tmp = Path(tmp_name)
        bucket_port = free_port()
        with start_bucket(bucket_port, "--all-present", cpus="1" if pin else None, log=tmp / "bucket.log"):
            mirror = f"http://{LOOPBACK}:{bucket_port}/cdn"
            env = {**os.environ, "ARCHEIO_HOST": LOOPBACK, "ARCHEIO_ADMIN_HOST": LOOPBACK, "ARCHEIO_RANGES_DIR": "",
                   "ARCHEIO_CACHE_DIR": str(tmp / "cache"), "DEFAULT_AWS_BASE_URL": mirror,
                   "ARCHEIO_LOG_LEVEL": "warning"}
            env.pop("ARCHEIO_HTTP", None)  # the default engine
            env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: the first start leaves the bytecode
            expected = f"{mirror}/containers/images/{DIGEST}"
            cold = one_start(env, server_cpus, tmp / "start-0.log", expected)
            print(f"  first start (index cache cold): {cold}")
            # The other tree has a cache directory of its own: its cache format may differ.
            other_env = {**env, "ARCHEIO_CACHE_DIR": str(tmp / "cache-against")}
            if args.against is not None:
                print(f"  first start of {args.against}: "
                      f"{one_start(other_env, server_cpus, tmp / 'against-0.log', expected, args.against)}")
            starts, against = [], []
            for n in range(1, args.starts + 1):
                heads = sum(bucket_counts(bucket_port).values())
                starts.append(one_start(env, server_cpus, tmp / f"start-{n}.log", expected))
                if sum(bucket_counts(bucket_port).values()) <= heads:
                    raise RuntimeError("the blob was answered without a HEAD to the mirror")
                print(f"  start {n}: {starts[-1]}")
                if args.against is not None:
                    against.append(one_start(other_env, server_cpus, tmp / f"against-{n}.log", expected,
                                             args.against))
                    print(f"  start {n} of {args.against}: {against[-1]}")
    summary = summarise(starts)
    baseline_file = args.results / "cold-start-baseline.json"
    result: dict[str, Any] = {"machine": info, "layout": layout, "cache_cold_start": cold, "starts": starts,
                              "summary": summary}
    if against:
        other = summarise(against)
        result["against"] = {"tree": str(args.against), "starts": against, "summary": other,
                             "ratio": {name: round(summary[name]["median"] / other[name]["median"], 3)
                                       for name in FIGURES}}
    args.results.mkdir(parents=True, exist_ok=True)
    if args.save_baseline:
        baseline_file.write_text(json.dumps(result, indent=2) + "\n")
    baseline = json.loads(baseline_file.read_text()) if baseline_file.exists() else None
    result["floors"] = floors(summary, baseline, str(info["cpu_model"]))
    (args.results / "cold-start.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "cold-start.md").write_text(render_markdown(result))
    append_history(args.results / "cold-start-history.csv", {
        "date": info["date"], "code": info["archeio_commit"], "cpu_model": info["cpu_model"],
        "load_average": info["load_average_at_start"][0], "starts": len(starts),
        **{f"{name}_median": summary[name]["median"] for name in FIGURES},
        **{f"{name}_range": f"{summary[name]['min']}-{summary[name]['max']}" for name in FIGURES},
    })
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
