"""The benchmarks' own bookkeeping, without running a benchmark: wrk2's, wrk's and callgrind's output,
history files, the scorecard, the throughput targets' references.

`tests/data/wrk2-mix-output.txt` is the real output of one short wrk2 run
(`-t1 -c4 -d12s -R200 -U` with benchmarks/wrk2_mix.lua against nginx
`return 307`, told to expect another Location), and
`tests/data/wrk-mix-output.txt` that of Debian's plain wrk with the same
hook (`-t1 -c4 -d2s`, the capacity run without wrk2): the parsers must
read what the benchmark reports from them.

`tests/data/callgrind-control-e.txt` is the real output of
`callgrind_control -e PID` for `archeio serve` under callgrind, read just
after its first blob answer, while the thread importing aiohttp's client
was still at work (the command's path shortened to the repository's).
No test here runs valgrind.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from harness import append_history  # noqa: E402
from instructions import check_answer, parse_totals, per_request, render_table, request_bytes  # noqa: E402
from latency_open_loop import (  # noqa: E402
    OPEN_LOOP,
    PACING,
    calibration_seconds,
    floors,
    loop_delta,
    parse_wrk,
    parse_wrk2,
)
from scorecard import collect_floors, spread  # noqa: E402
from throughput import AWS_CLIENT, BLOB_PATH, Target, history_row, with_references  # noqa: E402

WRK2_OUTPUT = Path(__file__).parent / "data" / "wrk2-mix-output.txt"
WRK_OUTPUT = Path(__file__).parent / "data" / "wrk-mix-output.txt"
CALLGRIND_OUTPUT = Path(__file__).parent / "data" / "callgrind-control-e.txt"


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


def test_callgrind_totals_are_every_threads_instructions_summed() -> None:
    assert parse_totals(CALLGRIND_OUTPUT.read_text()) == 807_461_241 + 799_884_865 + 80_291 + 498 + 491 + 498


def test_callgrind_control_without_totals_is_refused() -> None:
    not_running = ("Error: Callgrind task with PID/name '6443' not detected.\n"
                   "See '/usr/bin/callgrind_control -h' for help.\n")
    with pytest.raises(RuntimeError, match="no Ir totals"):
        parse_totals(not_running)


def test_callgrind_totals_of_another_event_are_refused() -> None:
    text = CALLGRIND_OUTPUT.read_text().replace("Totals:         Ir", "Totals:         Dr")
    with pytest.raises(RuntimeError, match="no Ir totals"):
        parse_totals(text)


def test_a_request_costs_the_difference_of_two_phases_over_their_difference_in_requests() -> None:
    # Both phases pay the same fixed 2,000,000 (their connection, the control's interruption).
    assert per_request((500, 2_000_000 + 500 * 36_000), (2_500, 2_000_000 + 2_500 * 36_000)) == 36_000
    with pytest.raises(ValueError):
        per_request((500, 1), (500, 2))


def _target(close: bool = False) -> Target:
    return Target("blob-aws", "archeio", "httptools", 8080, BLOB_PATH, AWS_CLIENT, "http://b/x", 1, close=close)


def test_instruction_requests_are_wrks_with_connection_close_only_when_asked() -> None:
    keep = request_bytes(_target(), close=False)
    assert keep == (f"GET {BLOB_PATH} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                    f"X-Forwarded-For: {AWS_CLIENT}\r\n\r\n").encode()
    assert request_bytes(_target(), close=True) == keep[:-2] + b"Connection: close\r\n\r\n"


def test_answer_check_gives_the_body_length_of_a_307_to_the_expected_location() -> None:
    head = b"HTTP/1.1 307 Temporary Redirect\r\nContent-Length: 5\r\nlocation: http://b/x"
    assert check_answer(head, "http://b/x") == 5


def test_answer_check_refuses_another_location_or_status() -> None:
    with pytest.raises(RuntimeError, match="expected a 307"):
        check_answer(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://b/y", "http://b/x")
    with pytest.raises(RuntimeError, match="expected a 307"):
        check_answer(b"HTTP/1.1 302 Found\r\nLocation: http://b/x", "http://b/x")


def test_close_targets_take_their_ratios_from_the_references_in_the_same_mode() -> None:
    nginx = Target("nginx", "nginx", None, 1, BLOB_PATH, AWS_CLIENT, "http://b/x", 1)
    bare = Target("bare-aiohttp", "aiohttp", None, 2, BLOB_PATH, AWS_CLIENT, "http://b/x", 2)
    found = with_references([nginx, bare, _target()], close=True)
    assert [(t.name, t.close, t.nginx, t.bare) for t in found] == [
        ("nginx (close)", True, None, None),
        ("bare-aiohttp (close)", True, "nginx (close)", None),
        ("blob-aws (close)", True, "nginx (close)", "bare-aiohttp (close)"),
    ]


def test_keep_alive_targets_have_no_bare_reference_when_it_was_not_measured() -> None:
    nginx = Target("nginx", "nginx", None, 1, BLOB_PATH, AWS_CLIENT, "http://b/x", 1)
    (_, blob) = with_references([nginx, _target()], close=False)
    assert (blob.name, blob.close, blob.nginx, blob.bare) == ("blob-aws", False, "nginx", None)


def test_throughput_history_names_close_and_engine_targets_apart() -> None:
    machine = {"date": "d", "archeio_commit": "c", "cpu_model": "EPYC", "load_average_at_start": [1.0]}
    row = {"ratio_to_nginx": 0.5, "ratio_min": 0.4, "ratio_max": 0.6, "cpu_ratio_to_nginx": 0.5,
           "cpu_us_per_request": 10.0, "rps": 1}
    summary = [{**row, "target": "nginx"}, {**row, "target": "blob-aws [aiohttp] (close)"},
               {**row, "target": "blob-aws", "ratio_to_bare_aiohttp": 2.0}]
    found = history_row({"machine": machine, "engines": ["httptools"], "summary": summary, "scaling": None})
    assert found["blob_aws_aiohttp_close_ratio"] == 0.5 and found["blob_aws_bare_ratio"] == 2.0
    assert "blob_aws_aiohttp_close_bare_ratio" not in found


def test_a_steps_loop_figures_are_what_the_step_added() -> None:
    lag = "archeio_event_loop_lag_seconds"

    def figures(samples: float, over_1ms: float, over_5ms: float, lag_sum: float, gen0: float) -> dict[str, float]:
        return {
            f"{lag}_count{{}}": samples, f"{lag}_sum{{}}": lag_sum,
            f'{lag}_bucket{{le="0.001"}}': samples - over_1ms, f'{lag}_bucket{{le="0.005"}}': samples - over_5ms,
            f'{lag}_bucket{{le="0.025"}}': samples,
            'archeio_gc_pause_seconds_count{generation="0"}': gen0,
            'archeio_gc_pause_seconds_sum{generation="0"}': gen0 * 0.0001,
        }

    step = loop_delta(figures(100, 10, 1, 0.05, 3), figures(700, 70, 6, 0.65, 5))
    assert (step["lag_samples"], step["lag_over_1ms"], step["lag_over_5ms"]) == (600, 60, 5)
    assert step["gc_collections"] == {"0": 2, "1": 0, "2": 0}
    assert "mean 1.00 ms" in step["loop"]
    assert loop_delta(None, figures(1, 0, 0, 0, 0)) == {}  # a server without the metrics: nothing said


def test_instruction_figures_less_the_timers_share_are_given_per_engine() -> None:
    rows = [{"path": "manifest", "engine": "httptools", "connection": "keep-alive", "instructions_per_request": 30_000,
             "min": 29_900, "max": 30_100, "wall_ms_per_request_under_callgrind": 0.5}]
    (line,) = render_table(rows, {"httptools": 100_000.0})[2:]
    assert line.endswith("| 0.5 | 29,950 |")  # 100,000 a second for half a millisecond: 50
    assert render_table(rows)[2].endswith("| 0.5 |  |")
