"""What the server costs at rest: the range lookup, the processes of `--workers 2` (`benchmarks/footprint`).

- **Range lookup**: `CloudIndex.lookup` in nanoseconds for the hardest
  kinds of address: IPv4 in AWS, IPv4 in Google Cloud, IPv4 in no range,
  IPv6 in AWS, IPv6 in no range, and an IPv4-mapped IPv6 address (which
  must be looked up as its IPv4 address). Each is timed `--repeats` times
  (timeit, 20,000 lookups a repeat) on the embedded data (the default);
  the figure per address is the median of the repeats with their range,
  and the headline is the worst address. Floor (issue 13): <= 400 ns, printed with the CPU
  model that measured it.
- **`archeio serve --workers 2`**: started `--starts` times with the admin
  port on; once /readyz answers 200 and each worker has served requests,
  the resident memory (VmRSS) of the supervisor, of each worker and of any
  other process in its tree. Floors: the supervisor under 25 MB; no
  multiprocessing resource tracker process (nor any process that is
  neither the supervisor nor a worker).

The existence caches' bytes per entry are memory_flood.py's.
Results: results/footprint.{json,md}, a line in footprint-history.csv.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

from harness import (
    EMBEDDED_RANGES,
    LOOPBACK,
    RESULTS,
    SERVER_CWD,
    Process,
    append_history,
    archeio_command,
    floors_table,
    free_port,
    machine,
    machine_line,
    process_tree,
)

LOOKUP_FLOOR_NS = 400.0
SUPERVISOR_FLOOR_MB = 25.0
LOOKUPS_PER_REPEAT = 20_000
ADDRESSES = {
    "IPv4, AWS (35.180.1.1)": "35.180.1.1",
    "IPv4, Google Cloud (35.220.26.1)": "35.220.26.1",
    "IPv4, no range (81.2.69.160)": "81.2.69.160",
    "IPv6, AWS (2a05:d012::1)": "2a05:d012::1",
    "IPv6, no range (2001:db8::1)": "2001:db8::1",
    "IPv4-mapped IPv6 (::ffff:35.180.1.1)": "::ffff:35.180.1.1",
}


# -- the range lookup -------------------------------------------------------------


def lookup_ns(repeats: int) -> dict[str, Any]:
    """ns per lookup, median and range of the repeats, per data set and address."""
    from iprange import load_index

    sources: dict[str, Path | None] = {"embedded": None}
    found: dict[str, dict[str, dict[str, float]]] = {}
    for name, source in sources.items():
        lookup = load_index(source).lookup
        found[name] = {}
        for label, address in ADDRESSES.items():
            lookup(address)  # any one-off work (parsing, caches) before the clock
            # A statement, not a lambda: the figure is the lookup's, without an extra call around it.
            times = timeit.repeat("lookup(address)", globals={"lookup": lookup, "address": address},
                                  number=LOOKUPS_PER_REPEAT, repeat=repeats)
            per = sorted(t / LOOKUPS_PER_REPEAT * 1e9 for t in times)
            found[name][label] = {"median": round(statistics.median(per), 1), "min": round(per[0], 1),
                                  "max": round(per[-1], 1)}
    worst_source, worst_label = max(((s, a) for s in found for a in found[s]),
                                    key=lambda key: found[key[0]][key[1]]["median"])
    return {"ns": found, "repeats": repeats, "lookups_per_repeat": LOOKUPS_PER_REPEAT,
            "worst": {"data": worst_source, "address": worst_label, **found[worst_source][worst_label]}}


# -- the processes of --workers 2 -----------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()


def get(port: int, path: str) -> int | None:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return None
    finally:
        conn.close()


def workers_processes(tmp: Path, run: int) -> dict[str, Any]:
    """Start `--workers 2`, wait until ready and serving, then read every process of its tree."""
    port, admin_port = free_port(), free_port()
    env = {**os.environ, "PORT": str(port), "ARCHEIO_HOST": LOOPBACK, "ARCHEIO_ADMIN_PORT": str(admin_port),
           "ARCHEIO_ADMIN_HOST": LOOPBACK, "ARCHEIO_WORKERS": "2", "ARCHEIO_LOG_LEVEL": "warning",
           **EMBEDDED_RANGES}
    with Process("archeio --workers 2", archeio_command(), env, log=tmp / f"workers-{run}.log",
                 cwd=SERVER_CWD) as server:
        deadline = time.monotonic() + 60
        while get(admin_port, "/readyz") != 200:
            if not server.alive():
                raise RuntimeError(f"archeio --workers 2 exited with {server.popen.returncode} before it was "
                                   f"ready; see {tmp}/workers-{run}.log")
            if time.monotonic() > deadline:
                raise RuntimeError(f"archeio --workers 2 was not ready within 60 s; see {tmp}/workers-{run}.log")
            time.sleep(0.05)
        # New connections spread over both workers (SO_REUSEPORT): each serves some.
        for _ in range(200):
            get(port, "/v2/pause/manifests/3.10")
        time.sleep(1.0)  # the workers' first counter snapshots, as in steady state
        members = process_tree(server.pid)
        processes = [{"pid": pid, "rss_mb": rss_mb(pid), "command": command_line(pid)[:200]}
                     for pid in members]
    supervisor, others = processes[0], processes[1:]
    trackers = [p for p in others if "resource_tracker" in p["command"]]
    return {"supervisor_mb": supervisor["rss_mb"], "processes": processes, "resource_trackers": len(trackers),
            "children": len(others), "total_mb": round(sum(p["rss_mb"] for p in processes), 1)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    values = [r["supervisor_mb"] for r in runs]
    totals = [r["total_mb"] for r in runs]
    return {"supervisor_mb": {"median": statistics.median(values), "min": min(values), "max": max(values)},
            "total_mb": {"median": statistics.median(totals), "min": min(totals), "max": max(totals)},
            "resource_trackers": max(r["resource_trackers"] for r in runs),
            "extra_processes": max(r["children"] - 2 for r in runs)}


def floors(lookups: dict[str, Any], workers: dict[str, Any], cpu_model: str) -> list[dict[str, Any]]:
    worst = lookups["worst"]
    supervisor = workers["supervisor_mb"]
    return [
        {"floor": f"worst CloudIndex.lookup <= {LOOKUP_FLOOR_NS:g} ns ({cpu_model})",
         "measured": f"{worst['median']} ns ({worst['min']}-{worst['max']}): {worst['address']}, {worst['data']}",
         "met": worst["median"] <= LOOKUP_FLOOR_NS},
        {"floor": f"supervisor of --workers 2 < {SUPERVISOR_FLOOR_MB:g} MB RSS",
         "measured": f"{supervisor['median']} MB ({supervisor['min']}-{supervisor['max']})",
         "met": supervisor["median"] < SUPERVISOR_FLOOR_MB},
        {"floor": "no multiprocessing resource tracker process (nor any but the two workers)",
         "measured": f"{workers['resource_trackers']} tracker(s), {workers['extra_processes']} extra process(es)",
         "met": workers["resource_trackers"] == 0 and workers["extra_processes"] <= 0},
    ]


def render_markdown(result: dict[str, Any]) -> str:
    lookups = result["lookups"]
    lines = [
        "# Footprint (benchmarks/footprint)",
        "",
        f"Machine: {machine_line(result['machine'])}.",
        "",
        f"`CloudIndex.lookup`, ns per lookup: median of {lookups['repeats']} repeats of "
        f"{lookups['lookups_per_repeat']:,} (min-max).",
        "",
        "| address | " + " | ".join(lookups["ns"]) + " |",
        "| --- |" + " ---: |" * len(lookups["ns"]),
    ]
    for label in ADDRESSES:
        cells = [f"{d[label]['median']} ({d[label]['min']}-{d[label]['max']})" for d in lookups["ns"].values()]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"`archeio serve --workers 2`, ready and serving, {len(result['workers_runs'])} starts "
              "(RSS in MB, first start's processes):", "", "| process | RSS MB | command |", "| --- | ---: | --- |"]
    for process in result["workers_runs"][0]["processes"]:
        lines.append(f"| {process['pid']} | {process['rss_mb']} | `{process['command'][:90]}` |")
    workers = result["workers"]
    lines += ["", f"Supervisor: {workers['supervisor_mb']['median']} MB (median; "
              f"{workers['supervisor_mb']['min']}-{workers['supervisor_mb']['max']}); whole tree "
              f"{workers['total_mb']['median']} MB.", "", *floors_table(result["floors"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/footprint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15, help="timing repeats per address (default 15)")
    parser.add_argument("--starts", type=int, default=3, help="starts of --workers 2 (default 3)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory for the result files")
    args = parser.parse_args(argv)

    info = machine()
    print(f"machine: {machine_line(info)}")
    lookups = lookup_ns(args.repeats)
    print(f"  worst lookup: {lookups['worst']}")
    with tempfile.TemporaryDirectory(prefix="archeio-footprint-") as tmp:
        runs = []
        for run in range(args.starts):
            runs.append(workers_processes(Path(tmp), run))
            print(f"  --workers 2: supervisor {runs[-1]['supervisor_mb']} MB, {runs[-1]['children']} children, "
                  f"{runs[-1]['resource_trackers']} resource tracker(s), tree {runs[-1]['total_mb']} MB")
    workers = summarise(runs)
    result = {"machine": info, "lookups": lookups, "workers": workers, "workers_runs": runs,
              "floors": floors(lookups, workers, str(info["cpu_model"]))}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "footprint.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results / "footprint.md").write_text(render_markdown(result))
    append_history(args.results / "footprint-history.csv", {
        "date": info["date"], "code": info["archeio_commit"], "cpu_model": info["cpu_model"],
        "load_average": info["load_average_at_start"][0],
        "lookup_worst_ns": lookups["worst"]["median"], "lookup_worst_range": f"{lookups['worst']['min']}-"
        f"{lookups['worst']['max']}", "lookup_worst_address": lookups["worst"]["address"],
        "supervisor_mb": workers["supervisor_mb"]["median"], "tree_mb": workers["total_mb"]["median"],
        "resource_trackers": workers["resource_trackers"],
    })
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
