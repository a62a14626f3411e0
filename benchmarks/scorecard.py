"""Every floor of the issues, from the latest result of each benchmark, and how figures spread over runs.

`make bench` (benchmarks/bench) prints this after running the
benchmarks, and the capacity report carries it. Each row names the
benchmark, the date and code version it measured and whether the floor
is met; a benchmark without a result file yet shows as not run.

The spread table reads the history CSVs (one line per run, every run
kept) and gives, for each headline figure, the median and range over the
runs measured on the same CPU model as the latest one: a single run is
never the whole story on a shared machine.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from harness import met_text, read_history

# Result file -> what the benchmark is called in the tables.
BENCHMARKS = {
    "throughput.json": "benchmarks/throughput",
    "latency-open-loop.json": "benchmarks/latency-open-loop",
    "latency-steps.json": "benchmarks/latency-steps",
    "cold-start.json": "benchmarks/cold-start",
    "footprint.json": "benchmarks/footprint",
    "memory-flood.json": "benchmarks/memory_flood.py",
}

# (history file, column, what it is) for the spread over runs.
HEADLINES = [
    ("throughput-history.csv", "blob_aws_ratio", "blob, AWS client with a regional mirror: share of nginx's req/s"),
    ("throughput-history.csv", "blob_unknown_ratio", "blob, unknown client: share of nginx's req/s"),
    ("throughput-history.csv", "manifest_ratio", "manifest: share of nginx's req/s"),
    ("throughput-history.csv", "blob_aws_cpu_ratio", "blob, AWS client: nginx's CPU per request / ours"),
    ("latency-open-loop-history.csv", "capacity_rps", "one worker's capacity, realistic mix (req/s)"),
    ("latency-open-loop-history.csv", "p99_ms_at_50", "p99 at 50% of capacity, wrk2 (ms)"),
    ("latency-open-loop-history.csv", "nginx_p99_ms_at_50", "nginx p99 at the same rate (ms)"),
    ("latency-steps-history.csv", "p99_ms_at_1000", "p99 of the Locust mix at 1,000 req/s (ms)"),
    ("cold-start-history.csv", "v2_ms_median", "cold start to the first 200 on /v2/ (ms)"),
    ("cold-start-history.csv", "blob_ms_median", "cold start to the first blob answer needing a HEAD (ms)"),
    ("cold-start-history.csv", "readyz_ms_median", "cold start to /readyz 200 (ms)"),
    ("footprint-history.csv", "lookup_worst_ns", "worst CloudIndex.lookup (ns)"),
    ("footprint-history.csv", "supervisor_mb", "supervisor RSS of --workers 2 (MB)"),
    ("memory-flood-history.csv", "bytes_per_configured_entry", "RSS per configured existence-cache entry (bytes)"),
]


def load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / name
    return json.loads(path.read_text()) if path.exists() else None


def collect_floors(results: Path) -> list[dict[str, Any]]:
    """Every floor of every benchmark's latest result, with where it comes from."""
    rows: list[dict[str, Any]] = []
    for name, benchmark in BENCHMARKS.items():
        result = load(results, name)
        if result is None:
            rows.append({"benchmark": benchmark, "floor": "(not run yet)", "measured": "-", "met": None,
                         "note": f"no {name}", "date": "-", "code": "-", "cpu_model": "-"})
            continue
        info = result.get("machine") or {}
        floors = result.get("floors")
        if floors is None and "bytes_per_configured_entry" in result:  # memory_flood.py
            value, floor = result["bytes_per_configured_entry"], result["floor_bytes"]
            floors = [{"floor": f"RSS per configured existence-cache entry <= {floor} B (cache size "
                                f"{result['cache_size']:,} per cache)", "measured": value,
                       "met": None if value is None else value <= floor}]
        if floors is None:
            rows.append({"benchmark": benchmark, "floor": "(result from before floors were recorded: run again)",
                         "measured": "-", "met": None, "note": "old result", "date": info.get("date", "-"),
                         "code": info.get("archeio_commit", "-"), "cpu_model": info.get("cpu_model", "-")})
        for floor in floors or []:
            rows.append({"benchmark": benchmark, **floor, "date": info.get("date", "-"),
                         "code": info.get("archeio_commit", "-"), "cpu_model": info.get("cpu_model", "-")})
    return rows


def spread(results: Path, cpu_model: str | None) -> list[dict[str, Any]]:
    """Median and range of each headline figure over the recorded runs on `cpu_model`."""
    rows = []
    for file, column, label in HEADLINES:
        runs = [r for r in read_history(results / file) if cpu_model is None or r.get("cpu_model") == cpu_model]
        values = []
        for run in runs:
            try:
                values.append(float(run.get(column) or ""))
            except ValueError:
                continue
        if values:
            rows.append({"figure": label, "runs": len(values), "median": round(statistics.median(values), 3),
                         "min": min(values), "max": max(values), "latest": values[-1]})
    return rows


def render(results: Path) -> str:
    floors = collect_floors(results)
    models = [f["cpu_model"] for f in floors if f["cpu_model"] != "-"]
    cpu_model = models[0] if models else None
    met = sum(1 for f in floors if f["met"])
    judged = sum(1 for f in floors if f["met"] is not None)
    lines = [
        f"## Floors: {met} of {judged} met",
        "",
        "| benchmark | floor | measured | met | date | code |",
        "| --- | --- | ---: | --- | --- | --- |",
    ]
    lines += [f"| {f['benchmark']} | {f['floor']} | {f['measured']} | {met_text(f)} | {f['date']} | {f['code']} |"
              for f in floors]
    rows = spread(results, cpu_model)
    if rows:
        lines += ["", f"## Across runs on {cpu_model} (history files, every run)", "",
                  "| figure | runs | median | min | max | latest |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['figure']} | {r['runs']} | {r['median']} | {r['min']} | {r['max']} | {r['latest']} |"
                  for r in rows]
    return "\n".join(lines) + "\n"
