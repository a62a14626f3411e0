"""Capacity report: from the latency steps and the throughput ceiling to "how many instances".

Reads benchmarks/results/latency-steps.json (benchmarks/latency-steps) and
benchmarks/results/throughput.json (benchmarks/throughput), and writes
benchmarks/results/capacity-report.md with two plots beside it:

- latency-vs-load.png: p50/p95/p99/max of the realistic mix against the
  offered rate (steps the load generator could not drive are marked);
- throughput-vs-nginx.png: requests/s per hot path next to the nginx
  baseline of the same run, and the per-core capacity (1 s / server CPU
  time per request) of each.

Where benchmarks/latency-open-loop has run, it adds wrk2's open-loop
latency near one worker's capacity. It also sizes the load generators:
how many Locust processes and wrk2 threads (each a core) a target rate
needs, from the per-process ceilings the runs measured. The floors of
every benchmark close the report (scorecard.py).

An instance here is one archeio worker process on one core (upstream ran
Go with GOMAXPROCS=1 on Cloud Run). The instances table gives two figures
for each target rate: what the latency steps showed one worker sustaining
within the p99 bound (a lower bound where the load generator, not the
server, ran out first), and what the realistic mix's CPU time per request
allows at a utilisation that keeps queueing short.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from harness import RESULTS, machine_line  # noqa: E402
from latency_open_loop import OPEN_LOOP  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
from scorecard import render as render_scorecard  # noqa: E402

TARGET_RATES = (1_000, 2_500, 5_000, 10_000)
GENERATOR_TARGETS = (1_000, 10_000, 50_000, 100_000, 500_000)
# Keep a generator below this share of its core: above it, it queues its own sends.
GENERATOR_CPU_LIMIT = 0.9
WRK2_PLAIN_PER_CORE = 60_000  # wrk2's README, without a Lua hook
P99_BOUNDS_MS = (10.0, 25.0)
# Plan CPU-bound capacity at this utilisation of the core: beyond about
# 60-70%, queueing makes the tail grow quickly (M/M/1: waiting ~ rho/(1-rho)).
UTILISATION = 0.6


def plot_latency(steps: list[dict[str, Any]], path: Path) -> None:
    rates = [s["offered_rps"] for s in steps]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, label, style in (("p50_ms", "p50", "o-"), ("p95_ms", "p95", "s-"), ("p99_ms", "p99", "^-"),
                              ("max_ms", "max", "x--")):
        ax.plot(rates, [s[key] for s in steps], style, label=label)
    if all(s.get("nginx_p99_ms") for s in steps):
        ax.plot(rates, [s["nginx_p99_ms"] for s in steps], ":", color="grey",
                label="p99 of nginx (fixed 307) under the same load")
    for s in steps:
        if not s["driven"]:
            ax.axvspan(s["offered_rps"] * 0.9, s["offered_rps"] * 1.1, color="grey", alpha=0.25)
            ax.annotate("generator limit", (s["offered_rps"], s["p50_ms"]), textcoords="offset points",
                        xytext=(-30, -15), fontsize=8)
    ax.axhline(10, color="red", linewidth=0.8, linestyle=":", label="10 ms floor (p99 at 1,000 req/s)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(rates, [str(r) for r in rates])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("offered load, requests/s (realistic pull mix)")
    ax.set_ylabel("latency, ms")
    ax.set_title("archeio, one worker: latency against offered load")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(summary: list[dict[str, Any]], path: Path) -> None:
    names = [row["target"] for row in summary]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    engines = list(dict.fromkeys(row.get("engine") for row in summary if row.get("engine")))
    palette = ["tab:blue", "tab:orange", "tab:green"]
    colours = ["grey" if row.get("engine") is None else palette[engines.index(row["engine"]) % len(palette)]
               for row in summary]
    left.bar(names, [row["rps"] for row in summary], color=colours)
    left.set_title("wrk -t1 -c64: requests/s (median of rounds)")
    for i, row in enumerate(summary):
        if row["ratio_to_nginx"] is not None:
            left.annotate(f"{row['ratio_to_nginx']:.2f}x", (i, row["rps"]), ha="center", fontsize=8,
                          textcoords="offset points", xytext=(0, 2))
    right.bar(names, [1e6 / row["cpu_us_per_request"] for row in summary], color=colours)
    right.set_title("per-core capacity: 1 s / server CPU per request")
    for ax in (left, right):
        ax.set_ylabel("requests/s")
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measured_capacity(steps: list[dict[str, Any]], bound_ms: float) -> tuple[int | None, bool]:
    """Highest driven, error-free step within the p99 bound; and whether the rig, not the server, capped it.

    The rig capped it when no higher step was driven, or when nginx under the
    same load also missed the bound at the next step.
    """
    good = [s for s in steps if s["driven"] and s["failures"] == 0 and s["p99_ms"] <= bound_ms]
    if not good:
        return None, False
    best = max(good, key=lambda s: s["offered_rps"])
    higher = [s for s in steps if s["offered_rps"] > best["offered_rps"] and s["driven"]]
    capped = not higher or (higher[0].get("nginx_p99_ms") or 0) > bound_ms
    return best["offered_rps"], capped


def mix_cpu_us(steps: list[dict[str, Any]]) -> float | None:
    """Server CPU per request of the realistic mix, at the busiest driven step (least idle overhead)."""
    driven = [s for s in steps if s["driven"] and s["server_cpu_us_per_request"]]
    return max(driven, key=lambda s: s["offered_rps"])["server_cpu_us_per_request"] if driven else None


def instances_table(steps: list[dict[str, Any]]) -> list[str]:
    cpu_us = mix_cpu_us(steps)
    cpu_capacity = UTILISATION * 1e6 / cpu_us if cpu_us else None
    header = ["target req/s"]
    for bound in P99_BOUNDS_MS:
        header.append(f"instances, measured p99 <= {bound:g} ms")
    header.append(f"instances, CPU-bound at {UTILISATION:.0%} of a core")
    lines = ["| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    capacities = [measured_capacity(steps, bound) for bound in P99_BOUNDS_MS]
    for rate in TARGET_RATES:
        cells = [f"{rate:,}"]
        for capacity, capped in capacities:
            if capacity is None:
                cells.append("not reached")
            else:
                cells.append(f"{'<= ' if capped else ''}{math.ceil(rate / capacity)} (at {capacity:,}/instance)")
        cells.append(f"{math.ceil(rate / cpu_capacity)} (at {cpu_capacity:,.0f}/instance)" if cpu_capacity else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def history_tables(results: Path) -> list[str]:
    """Every recorded run's headline figures, from the history CSVs, as Markdown tables."""
    lines: list[str] = []
    for name, title in (("throughput-history.csv", "Throughput runs"), ("latency-steps-history.csv", "Latency runs"),
                        ("latency-open-loop-history.csv", "Open-loop latency runs"),
                        ("cold-start-history.csv", "Cold starts"), ("footprint-history.csv", "Footprint runs"),
                        ("memory-flood-history.csv", "Memory floods")):
        path = results / name
        if not path.exists():
            continue
        with open(path, newline="") as rows:
            table = list(csv.reader(rows))
        lines += ["", f"{title} ([{name}]({name})):", "", "| " + " | ".join(table[0]) + " |",
                  "|" + " --- |" * len(table[0])]
        lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return lines


def locust_ceiling(steps: list[dict[str, Any]]) -> tuple[float | None, str]:
    """Requests/s one Locust process sustains with the realistic mix, and how that was found.

    From its CPU time per request at the busiest step it drove, at 90% of a
    core: Locust's cost per request hardly changes with the rate, and on a
    shared machine the first step it could not drive often failed for
    lack of a CPU (the neighbours'), not because Locust had run out. Where
    Locust did run out of its core, what it achieved there caps the figure.
    """
    driven = [s for s in steps if s["driven"] and s.get("generator_cpu_share")]
    if not driven:
        return None, "no step driven"
    best = max(driven, key=lambda s: s["offered_rps"])
    processes = best.get("processes") or 1
    per_core = best["achieved_rps"] / processes / best["generator_cpu_share"]
    ceiling = GENERATOR_CPU_LIMIT * per_core
    how = (f"{1e6 / per_core:,.0f} us of Locust CPU per request at {best['offered_rps']:,} req/s, the busiest step "
           f"it drove, at {GENERATOR_CPU_LIMIT:.0%} of a core")
    saturated = next((s for s in steps
                      if not s["driven"] and (s.get("generator_cpu_share") or 0) >= GENERATOR_CPU_LIMIT), None)
    if saturated and saturated["achieved_rps"] / (saturated.get("processes") or 1) < ceiling:
        ceiling = saturated["achieved_rps"] / (saturated.get("processes") or 1)
        how += f"; capped by what one process achieved with its core full ({saturated['offered_rps']:,} offered)"
    return ceiling, how


def wrk2_ceiling(open_loop: dict[str, Any]) -> tuple[float | None, str]:
    """Requests/s one wrk2 thread (one core) sends with the mix hook, from its CPU time per request.

    Taken from the busiest fixed-rate run, not the saturating ones: paced
    sends wake wrk2 for every few requests, while a saturated wrk2 batches
    them and costs about half as much per request, which would overstate
    what it can pace.
    """
    if open_loop.get("mode", OPEN_LOOP) != OPEN_LOOP:
        return None, "no wrk2 in the last benchmarks/latency-open-loop run"
    paced = [s for s in open_loop["steps"] if s.get("generator_cpu_us_per_request")]
    if not paced:
        return None, "no fixed-rate runs"
    busiest = max(paced, key=lambda s: s["achieved_rps"])
    us = busiest["generator_cpu_us_per_request"]
    return GENERATOR_CPU_LIMIT * 1e6 / us, (
        f"{us} us of wrk2 CPU per request with the mix hook at {busiest['rate']:,} req/s, its busiest fixed-rate "
        f"run, extrapolated to {GENERATOR_CPU_LIMIT:.0%} of a core (wrk2's README: about {WRK2_PLAIN_PER_CORE:,} "
        "plain requests/s per core)")


def generators_section(steps: list[dict[str, Any]], open_loop: dict[str, Any] | None) -> list[str]:
    locust, locust_how = locust_ceiling(steps)
    wrk2, wrk2_how = wrk2_ceiling(open_loop) if open_loop else (None, "benchmarks/latency-open-loop has not run")
    lines = [
        "## Load generators needed",
        "",
        "Each Locust process and each wrk2 thread uses one core: a target rate needs that many free cores "
        "on the generator machines (plus a little for Locust's master). Ceilings per process:",
        "",
        f"- Locust, realistic mix: {f'{locust:,.0f} req/s' if locust else '-'} ({locust_how}); distributed "
        "mode: `--processes N` on one machine, `--master`/`--worker` across machines, deploy/loadtest/ on "
        "Kubernetes.",
        f"- wrk2, realistic mix (open loop): {f'{wrk2:,.0f} req/s' if wrk2 else '-'} ({wrk2_how}); `-t N` "
        "threads on N cores; one wrk2 runs on one machine.",
        "",
        "| target req/s | Locust processes | wrk2 threads |",
        "| ---: | ---: | ---: |",
    ]
    for rate in GENERATOR_TARGETS:
        lines.append(f"| {rate:,} | {math.ceil(rate / locust) if locust else '-'} | "
                     f"{math.ceil(rate / wrk2) if wrk2 else '-'} |")
    return lines


def open_loop_section(open_loop: dict[str, Any]) -> list[str]:
    capacity = open_loop["capacity"]
    mode = open_loop.get("mode", OPEN_LOOP)
    tool = "wrk2" if mode == OPEN_LOOP else "wrk"
    how = ("Each rate ran {seconds} s after wrk2's calibration; latency corrected for coordinated omission "
           "(from the schedule), ms." if mode == OPEN_LOOP else
           "Each rate ran {seconds} s, driven by Locust's paced users, up to the first rate they could not "
           "drive (nginx only at the rates they drove); a paced user waits for each answer, so these "
           "percentiles are not corrected for coordinated omission, ms.").format(seconds=open_loop["seconds"])
    lines = [
        f"## Latency near capacity ({mode}, one worker)",
        "",
        f"{machine_line(open_loop['machine'])}; {open_loop['layout']}. Capacity ({tool} saturating, median of "
        f"rounds): archeio {capacity['archeio']['rps']:,} req/s"
        + (f", nginx {capacity['nginx']['rps']:,} req/s" if "nginx" in capacity else "")
        + f". {how} nginx got the same absolute rates.",
        "",
        "| target | share of capacity | req/s | p50 | p99 | p99.9 | max | uncorrected p99 | server CPU us/req |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {s['target']} | {s['share']}% | {s['rate']:,} | {cell(s.get('p50_ms'))} | {cell(s.get('p99_ms'))} | "
              f"{cell(s.get('p999_ms'))} | {cell(s.get('max_ms'))} | {cell(s.get('uncorrected_p99_ms'))} | "
              f"{cell(s.get('server_cpu_us_per_request'))} |" for s in open_loop["steps"]]
    notes = [f"- {s['target']} at {s['share']}%: not driven, {s.get('note') or 'the generator could not drive it'}"
             for s in open_loop["steps"] if not s["driven"]]
    notes += [f"- {share}% = {rate:,} req/s: not attempted, {why}"
              for share, rate, why in open_loop.get("not_attempted", [])]
    return lines + ([""] + notes if notes else [])


def cell(value: Any) -> str:
    return "-" if value is None else str(value)


def render(latency: dict[str, Any], throughput: dict[str, Any], history: list[str],
           open_loop: dict[str, Any] | None = None, results: Path = RESULTS) -> str:
    steps = latency["steps"]
    summary = throughput["summary"]
    blob = next(r for r in summary if r["target"] == "blob-aws")
    cpu_us = mix_cpu_us(steps)
    lines = [
        "# archeio capacity report",
        "",
        "Measured on one machine, with the load generator on the same machine:",
        "",
        f"- latency steps: {machine_line(latency['machine'])}; {latency['layout']}",
        f"- throughput ceiling: {machine_line(throughput['machine'])}; {throughput['layout']}",
        "",
        "Reproduce: `make bench` (benchmarks/bench: every benchmark, then this report). Raw figures: "
        "[latency-steps.csv](latency-steps.csv), [throughput.csv](throughput.csv), "
        "[latency-open-loop.csv](latency-open-loop.csv), and the `.json`/`.md` beside them.",
        "",
        "## Latency under load (realistic pull mix, one worker)",
        "",
        "![latency against offered load](latency-vs-load.png)",
        "",
        "| offered req/s | achieved | driven | p50 ms | p95 ms | p99 ms | max ms | errors | "
        "server CPU us/req | nginx p50 / p99 ms, same load | nginx CPU us/req | neighbours' CPU (cores) |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in steps:
        lines.append(f"| {s['offered_rps']} | {s['achieved_rps']} | {'yes' if s['driven'] else 'no: generator'} | "
                     f"{s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} | {s['max_ms']} | {s['failures']} | "
                     f"{s['server_cpu_us_per_request']} | "
                     f"{s.get('nginx_p50_ms', '-')} / {s.get('nginx_p99_ms', '-')} | "
                     f"{s.get('nginx_cpu_us_per_request', '-')} | {s.get('neighbour_cpu_cores', '-')} |")
    lines += [
        "",
        "After each step the same Locust load went to a one-worker nginx answering a fixed 307, pinned like "
        "the server: its latency is what the load generator and the machine add on their own, so the "
        "server's own share is the difference. \"Neighbours' CPU\" is what other processes on the machine "
        "used during the step (cores): figures taken while it is high include waiting for a CPU.",
        "",
        "## Throughput ceiling against nginx",
        "",
        "![throughput against the nginx baseline](throughput-vs-nginx.png)",
        "",
        "| target | req/s | ratio of nginx (min-max) | CPU ratio (nginx's CPU per request / ours) | p99 ms | "
        "server CPU us/request | per-core capacity req/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in summary:
        ratio = ("1" if row["ratio_to_nginx"] is None
                 else f"{row['ratio_to_nginx']} ({row.get('ratio_min')}-{row.get('ratio_max')})")
        lines.append(f"| {row['target']} | {row['rps']} | {ratio} | {row.get('cpu_ratio_to_nginx', '-')} | "
                     f"{row['p99_ms']} | {row['cpu_us_per_request']} | {round(1e6 / row['cpu_us_per_request']):,} |")
    scaling = throughput.get("scaling")
    if scaling:
        lines += ["", "Multi-worker scaling (blob hot path; CPU per request summed over the workers):", "",
                  "| workers | req/s | p99 ms | server CPU us/request |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {row['target']} | {row['rps']} | {row['p99_ms']} | {row['cpu_us_per_request']} |"
                  for row in scaling["rows"]]
        lines.append(f"\nCPU time per request, 2 workers / 1 worker: **{scaling['cpu_per_request_ratio_2_to_1']}** "
                     f"(median of rounds; per round: {scaling.get('ratio_per_round', '-')}).")
    lines += [
        "",
        "## Instances needed",
        "",
        "One instance = one worker process on one core. The measured columns use the highest step the "
        "latency run drove with zero errors and p99 within the bound (\"<=\": the rig, not the server, set "
        "that limit: no higher step could be driven, or nginx under the same load also missed the bound at "
        "the next step; the true per-instance capacity is then higher and fewer instances suffice). "
        f"The CPU-bound column divides one core by the realistic mix's server CPU time per request "
        f"({cpu_us} us at the busiest driven step) at {UTILISATION:.0%} utilisation. For comparison, the "
        f"blob hot path alone costs {blob['cpu_us_per_request']} us per request "
        f"({round(1e6 / blob['cpu_us_per_request']):,} req/s per core). Upstream sized Cloud Run for "
        "10,000 req/s per region at 1,000 concurrent requests per instance.",
        "",
        *instances_table(steps),
        "",
        *generators_section(steps, open_loop),
        "",
        *(open_loop_section(open_loop) + [""] if open_loop else []),
        render_scorecard(results),
    ]
    if history:
        lines += ["", "## Run to run", "",
                  "The same commands at other times of the day on the same shared machine: how much the "
                  "figures move with the neighbours' load.", *history]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/capacity-report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory of the result files")
    args = parser.parse_args(argv)
    try:
        latency = json.loads((args.results / "latency-steps.json").read_text())
        throughput = json.loads((args.results / "throughput.json").read_text())
    except FileNotFoundError as exc:
        print(f"benchmarks/capacity-report: {exc.filename} is missing: run benchmarks/latency-steps and "
              "benchmarks/throughput first", file=sys.stderr)
        return 2
    open_loop_file = args.results / "latency-open-loop.json"
    open_loop = json.loads(open_loop_file.read_text()) if open_loop_file.exists() else None
    plot_latency(latency["steps"], args.results / "latency-vs-load.png")
    plot_throughput(throughput["summary"], args.results / "throughput-vs-nginx.png")
    report = render(latency, throughput, history_tables(args.results), open_loop, args.results)
    (args.results / "capacity-report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
