"""The benchmarks' own bookkeeping, without running a benchmark: wrk2's and wrk's output, history files, the scorecard.

`tests/data/wrk2-mix-output.txt` is the real output of one short wrk2 run
(`-t1 -c4 -d12s -R200 -U` with benchmarks/wrk2_mix.lua against nginx
`return 307`, told to expect another Location), and
`tests/data/wrk-mix-output.txt` that of Debian's plain wrk with the same
hook (`-t1 -c4 -d2s`, the capacity run without wrk2): the parsers must
read what the benchmark reports from them.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from harness import append_history  # noqa: E402
from latency_open_loop import OPEN_LOOP, PACING, calibration_seconds, floors, parse_wrk, parse_wrk2  # noqa: E402
from scorecard import collect_floors, spread  # noqa: E402

WRK2_OUTPUT = Path(__file__).parent / "data" / "wrk2-mix-output.txt"
WRK_OUTPUT = Path(__file__).parent / "data" / "wrk-mix-output.txt"


def test_wrk2_output_gives_corrected_and_uncorrected_percentiles() -> None:
    figures = parse_wrk2(WRK2_OUTPUT.read_text())
    assert (figures["p50_ms"], figures["p99_ms"], figures["p999_ms"]) == (0.86, 1.92, 4.32)
    assert (figures["uncorrected_p50_ms"], figures["uncorrected_p99_ms"]) == (0.031, 0.148)
    assert figures["max_ms"] == 4.32


def test_wrk2_output_gives_counts_rates_and_the_hooks_answers() -> None:
    figures = parse_wrk2(WRK2_OUTPUT.read_text())
    assert (figures["requests"], figures["requests_measured"], figures["achieved_rps"]) == (2401, 396, 200.07)
    # nginx's one Location was not the one the hook was told to expect: every 307 is wrong.
    assert (figures["answers_307"], figures["wrong_locations"], figures["unexpected_answers"]) == (2401, 2401, 0)
    assert figures["problems"][0].startswith("307 to http://127.0.0.1:9/bucket/x")


def test_wrk2_output_without_the_uncorrected_histogram_is_refused() -> None:
    text = WRK2_OUTPUT.read_text().split("  Latency Distribution (HdrHistogram - Uncorrected")[0]
    with pytest.raises(RuntimeError, match="-U"):
        parse_wrk2(text)


def test_plain_wrk_output_gives_the_rate_and_the_hooks_answers() -> None:
    figures = parse_wrk(WRK_OUTPUT.read_text())
    assert (figures["requests"], figures["achieved_rps"], figures["socket_errors"]) == (55690, 27764.69, 0)
    assert (figures["answers_307"], figures["wrong_locations"], figures["unexpected_answers"]) == (55690, 55690, 0)


def _open_loop_result(mode: str, p99_at_50: float, failures: int) -> dict:  # type: ignore[type-arg]
    step = {"target": "archeio", "share": 50, "rate": 1000, "p99_ms": p99_at_50, "driven": True,
            "unexpected_answers": failures, "wrong_locations": None, "socket_errors": None}
    return {"mode": mode, "steps": [step], "capacity": {"archeio": {"unexpected_answers": 0}}}


def test_paced_figures_do_not_judge_the_open_loop_floor_but_count_wrong_answers() -> None:
    latency, answers = floors(_open_loop_result(PACING, 2.0, 3))
    assert (latency["measured"], latency["met"]) == (2.0, None) and "wrk2" in latency["note"]
    assert (answers["measured"], answers["met"]) == (3, False)


def test_open_loop_figures_judge_the_floor() -> None:
    latency, answers = floors(_open_loop_result(OPEN_LOOP, 12.0, 0))
    assert (latency["measured"], latency["met"], answers["met"]) == (12.0, False, True)


def test_calibration_covers_wrk2s_ten_seconds_and_its_connection_stagger() -> None:
    assert calibration_seconds(64, 1) == 12  # 10 s + 64 x 5 ms, rounded up, + 1
    assert calibration_seconds(64, 2) == 12
    assert calibration_seconds(400, 1) == 13


def test_history_keeps_every_run_when_the_columns_change(tmp_path: Path) -> None:
    history = tmp_path / "history.csv"
    append_history(history, {"date": "d1", "ratio": 0.4})
    append_history(history, {"date": "d2", "ratio": 0.5})
    append_history(history, {"date": "d3", "cpu_model": "Xeon", "ratio": 0.6})
    with open(history, newline="") as rows:
        found = list(csv.DictReader(rows))
    assert [(r["date"], r["ratio"], r["cpu_model"]) for r in found] == [("d1", "0.4", ""), ("d2", "0.5", ""),
                                                                        ("d3", "0.6", "Xeon")]


def test_scorecard_names_benchmarks_not_run_and_judges_the_others(tmp_path: Path) -> None:
    machine = {"date": "2026-12-01", "archeio_commit": "abc", "cpu_model": "Xeon"}
    (tmp_path / "cold-start.json").write_text(json.dumps({"machine": machine, "floors": [
        {"floor": "/v2/ <= 300 ms", "measured": 250, "met": True}]}))
    (tmp_path / "memory-flood.json").write_text(json.dumps({"machine": machine, "bytes_per_configured_entry": 519,
                                                            "floor_bytes": 300, "cache_size": 100000}))
    rows = {row["benchmark"]: row for row in collect_floors(tmp_path)}
    assert rows["benchmarks/cold-start"]["met"] is True and rows["benchmarks/cold-start"]["code"] == "abc"
    assert rows["benchmarks/memory_flood.py"]["met"] is False
    assert rows["benchmarks/throughput"]["floor"] == "(not run yet)" and rows["benchmarks/throughput"]["met"] is None


def test_spread_over_runs_counts_only_the_same_cpu_model(tmp_path: Path) -> None:
    for model, value in (("Xeon", 500), ("EPYC", 300), ("Xeon", 700), ("Xeon", 600)):
        append_history(tmp_path / "cold-start-history.csv", {"cpu_model": model, "v2_ms_median": value})
    (row,) = [r for r in spread(tmp_path, "Xeon") if "/v2/" in r["figure"]]
    assert (row["runs"], row["median"], row["min"], row["max"], row["latest"]) == (3, 600, 500, 700, 600)
