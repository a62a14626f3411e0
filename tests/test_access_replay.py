"""Reading access logs into a replay schedule (benchmarks/access_replay.py), without a server."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from access_replay import Entry, ReplayError, parse_log, partition, schedule  # noqa: E402


def access_line(time: str, url: str, address: str, latency: str = "0.000500s", status: int = 307,
                method: str = "GET") -> str:
    """An access line shaped like the server's (docs/operations.md)."""
    return json.dumps({
        "severity": "INFO", "time": time, "logger": "archeio.access", "message": f"{method} {url} {status}",
        "httpRequest": {"requestMethod": method, "requestUrl": url, "status": status, "remoteIp": address,
                        "latency": latency},
        "kind": "blob", "backend": "mirror",
    })


def test_json_access_lines_arrive_latency_before_they_were_written() -> None:
    entries, _ = parse_log([access_line("2026-12-01T10:00:00.250Z", "/v2/", "35.180.1.1", latency="0.050000s")])
    written = datetime.datetime(2026, 12, 1, 10, 0, 0, 250_000, tzinfo=datetime.UTC).timestamp()
    assert entries[0].arrival == pytest.approx(written - 0.050)


def test_other_log_lines_are_skipped_and_counted() -> None:
    lines = [json.dumps({"severity": "INFO", "logger": "archeio.server", "message": "serving"}), "",
             access_line("2026-12-01T10:00:00.000Z", "/v2/", "35.180.1.1")]
    entries, skipped = parse_log(lines)
    assert [e.target for e in entries] == ["/v2/"] and skipped == 2


def test_entries_are_put_in_arrival_order() -> None:
    # Written when answered: a slow request's line comes after a later, fast one's.
    slow = access_line("2026-12-01T10:00:00.100Z", "/v2/slow/manifests/a", "1.1.1.1", latency="0.090000s")
    fast = access_line("2026-12-01T10:00:00.050Z", "/v2/fast/manifests/a", "1.1.1.1", latency="0.000100s")
    entries, _ = parse_log([fast, slow])
    assert [e.target for e in entries] == ["/v2/slow/manifests/a", "/v2/fast/manifests/a"]


def test_json_lines_keep_method_status_and_client() -> None:
    (entry,), _ = parse_log([access_line("2026-12-01T10:00:00Z", "/v2/a/manifests/b?x=1", "2a05:d012::1",
                                         status=404, method="HEAD")])
    assert (entry.method, entry.target, entry.address, entry.status) == ("HEAD", "/v2/a/manifests/b?x=1",
                                                                       "2a05:d012::1", 404)


def test_plain_list_with_and_without_times() -> None:
    timed, _ = parse_log(["1700000000.5 GET /v2/ 35.180.1.1", "2026-12-01T10:00:00Z head /v2/x/manifests/y 1.2.3.4"])
    assert [(e.method, e.address) for e in timed] == [("GET", "35.180.1.1"), ("HEAD", "1.2.3.4")]
    untimed, _ = parse_log(["GET /v2/ 35.180.1.1"])
    assert untimed == [Entry(None, "GET", "/v2/", "35.180.1.1", None)]


def test_a_log_mixing_timed_and_untimed_records_is_refused() -> None:
    with pytest.raises(ReplayError, match="some records have a time"):
        parse_log(["1700000000 GET /v2/ 1.1.1.1", "GET /v2/ 1.1.1.1"])


def test_a_malformed_plain_line_is_refused() -> None:
    with pytest.raises(ReplayError, match="METHOD TARGET ADDRESS"):
        parse_log(["GET /v2/"])


def test_schedule_divides_the_recorded_gaps_by_the_speedup() -> None:
    entries = [Entry(100.0, "GET", "/v2/", "a", None), Entry(101.0, "GET", "/v2/", "b", None),
               Entry(103.0, "GET", "/v2/", "c", None)]
    assert [s.due for s in schedule(entries, speedup=4)] == [0.0, 0.25, 0.75]


def test_untimed_entries_are_spread_at_the_given_rate() -> None:
    entries = [Entry(None, "GET", "/v2/", "a", None)] * 3
    assert [s.due for s in schedule(entries, rate=10)] == [0.0, 0.1, 0.2]
    with pytest.raises(ReplayError, match="give a rate"):
        schedule(entries)


def test_partition_gives_each_client_to_exactly_one_process_in_order() -> None:
    entries = [Entry(float(i), "GET", f"/v2/{i}", f"10.0.{i % 7}.1", None) for i in range(200)]
    plan = schedule(entries)
    parts = [partition(plan, index, 3) for index in range(3)]
    assert sorted(s.due for part in parts for s in part) == [s.due for s in plan]
    owners: dict[str, set[int]] = {}
    for index, part in enumerate(parts):
        assert [s.due for s in part] == sorted(s.due for s in part)
        for s in part:
            owners.setdefault(s.entry.address or "", set()).add(index)
    assert all(len(found) == 1 for found in owners.values())
