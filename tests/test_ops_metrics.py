"""Metrics and health on the admin port, as an operator meets them.

A real `archeio serve --workers 2` answers real requests; its admin port is
scraped over HTTP and every count must add up over both workers. The
collector itself is also checked on plain snapshots (no processes).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from archeio.metrics import CHECK_BUCKETS, REQUEST_BUCKETS, Snapshot, render, retire

from .conftest import AWS_EU_WEST_3, GOOGLE_CLOUD, NOBODY
from .ops_support import (
    MISSING_BLOB,
    ArcheioProcess,
    SnapshotSource,
    ThreadedBucket,
    admin_get,
    blob_url,
    http_get,
    requests_on_new_connections,
    scrape,
    total,
    wait_for,
    write_mirrors,
    xff,
)

# Every test here runs on each HTTP engine (tests/engines.py).
pytestmark = pytest.mark.usefixtures("engine")

# -- the collector, on plain snapshots ------------------------------------------


def _worker(name: str, mirror_hits: int, hit_seconds: float) -> Snapshot:
    buckets = [0] * (len(CHECK_BUCKETS) + 1)
    buckets[0] = 1
    return {
        "worker": name,
        "ready": True,
        "process": {"cpu_seconds": 1.5, "resident_memory_bytes": 50_000_000, "virtual_memory_bytes": 90_000_000,
                    "open_fds": 12, "max_fds": 1024, "start_time_seconds": 1_700_000_000.0},
        "build": {"version": "0.1.0", "python": "3.11.7", "engine": "httptools"},
        "requests": [["blob", "mirror", 307, mirror_hits], ["manifest", "upstream", 307, 2]],
        "latency": [["blob", "3xx", _one_bucket(mirror_hits, 2), mirror_hits * 0.0001]],
        "blob_decisions": [["AWS", "eu-west-3", "mirror", mirror_hits], ["", "", "upstream", 1]],
        "checks": [["http://m", "hit", 1]],
        "check_latency": [["http://m", "hit", buckets, hit_seconds]],
        "cache": [["http://m", "hits", 1], ["http://m", "misses", 0]],
        "breakers": {"http://m": "closed"},
        "connections": {"open": 3, "idle": 1, "reading": 1, "lingering": 0, "busy": 1, "awaiting_check": 1},
        "connections_closed": {"header_timeout": 2},
        "ranges": {"AWS": {"prefixes": 10, "serial": "s", "published": 0.0, "loaded": 5.0}},
        "reloads": [["AWS", "loaded", 1]],
    }


def _one_bucket(count: int, bucket: int) -> list[int]:
    counts = [0] * (len(REQUEST_BUCKETS) + 1)
    counts[bucket] = count
    return counts


def _samples(snaps: list[Snapshot]) -> list[tuple[str, dict[str, str], float]]:
    # Our own rendering, read back by the Prometheus project's parser.
    text = render(SnapshotSource(snaps, restarts=1)).decode()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def test_collector_sums_workers_and_keeps_counts_of_retired_ones() -> None:
    dead = retire(_worker("1", 100, 0.001))
    samples = _samples([_worker("0", 3, 0.002), _worker("1", 4, 0.003), dead])
    assert total(samples, "archeio_requests_total", kind="blob", decision="mirror", status="307") == 107
    assert total(samples, "archeio_blob_decisions_total", cloud="AWS", region="eu-west-3") == 107
    assert total(samples, "archeio_blob_decisions_total", cloud="none", region="none") == 3
    assert total(samples, "archeio_existence_checks_total", mirror="http://m", outcome="hit") == 3
    assert total(samples, "archeio_existence_check_seconds_count", mirror="http://m", outcome="hit") == 3
    assert total(samples, "archeio_existence_check_seconds_bucket", outcome="hit", le="+Inf") == 3
    assert total(samples, "archeio_existence_check_seconds_sum", outcome="hit") == pytest.approx(0.006)
    assert total(samples, "archeio_ranges_reloads_total", cloud="AWS", outcome="loaded") == 3
    # Gauges of a dead worker are gone; live ones are summed or per worker.
    assert total(samples, "archeio_requests_awaiting_check") == 2
    assert total(samples, "archeio_connections", state="reading") == 2
    assert total(samples, "archeio_connections_closed_total", reason="header_timeout") == 6
    assert total(samples, "archeio_existence_cache_entries", mirror="http://m", cache="hits") == 2
    assert total(samples, "archeio_mirror_breaker_state", mirror="http://m", state="closed") == 2
    assert {labels["worker"] for name, labels, _ in samples if name == "archeio_ranges_prefixes"} == {"0", "1"}
    assert total(samples, "archeio_worker_restarts_total") == 1


def test_collector_sums_latency_histograms_of_live_and_retired_workers() -> None:
    samples = _samples([_worker("0", 3, 0.002), _worker("1", 4, 0.003), retire(_worker("1", 100, 0.001))])
    labels = {"kind": "blob", "status_class": "3xx"}
    assert total(samples, "archeio_request_duration_seconds_count", **labels) == 107
    assert total(samples, "archeio_request_duration_seconds_sum", **labels) == pytest.approx(0.0107)
    # Cumulative: nothing below the bucket the observations are in, all of them from it on.
    assert total(samples, "archeio_request_duration_seconds_bucket", le=repr(REQUEST_BUCKETS[1]), **labels) == 0
    assert total(samples, "archeio_request_duration_seconds_bucket", le=repr(REQUEST_BUCKETS[2]), **labels) == 107
    assert total(samples, "archeio_request_duration_seconds_bucket", le="+Inf", **labels) == 107


def test_process_metrics_are_per_process_and_the_supervisor_reports_its_own() -> None:
    supervisor = {"worker": "supervisor", "process": _worker("x", 0, 0)["process"],
                  "build": {"version": "0.1.0", "python": "3.11.7", "engine": "httptools"}}
    samples = _samples([_worker("0", 3, 0.002), _worker("1", 4, 0.003), supervisor, retire(_worker("2", 1, 0.1))])
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
                 "process_open_fds", "process_max_fds", "process_start_time_seconds"):
        assert {labels["worker"] for sample, labels, _ in samples if sample == name} == {"0", "1", "supervisor"}, name
    assert total(samples, "process_resident_memory_bytes", worker="0") == 50_000_000
    # The supervisor serves no requests: it has no line of its own there.
    per_worker = {labels["worker"] for name, labels, _ in samples if name == "archeio_worker_requests_total"}
    assert per_worker == {"0", "1"}
    # One build, however many processes report it.
    builds = [labels for name, labels, _ in samples if name == "archeio_build_info"]
    assert builds == [{"version": "0.1.0", "python": "3.11.7", "engine": "httptools"}]
    assert not any(name.startswith("archeio_worker_resident") or name.startswith("archeio_worker_cpu")
                   for name, _, _ in samples)


def test_rate_limit_tables_are_summed_and_forgotten_buckets_survive_a_restart() -> None:
    dead = {"worker": "1", "rate_clients": 50, "rate_forgotten": 5}
    snaps = [
        {"worker": "0", "rate_clients": 3, "rate_forgotten": 1},
        {"worker": "1", "rate_clients": 4, "rate_forgotten": 2},
        retire(dead),
    ]
    page = render(SnapshotSource(snaps, restarts=1)).decode().splitlines()
    assert "archeio_rate_limit_clients 7.0" in page  # the live tables only
    assert "archeio_rate_limit_forgotten_total 8.0" in page  # a counter never goes down


# -- a real server with two workers ----------------------------------------------------


@pytest.fixture(scope="module")
def bucket() -> Iterator[ThreadedBucket]:
    with ThreadedBucket() as running:
        yield running


@pytest.fixture(scope="module")
def two_workers(
    engine: str, bucket: ThreadedBucket, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ArcheioProcess]:
    tmp = tmp_path_factory.mktemp("metrics")
    mirrors = write_mirrors(tmp / "mirrors.toml", {"eu-west-3": bucket.base("euw3")})
    env = {
        "ARCHEIO_WORKERS": "2",
        "ARCHEIO_MIRRORS_FILE": str(mirrors),
        "DEFAULT_AWS_BASE_URL": bucket.base("cdn"),
    }
    with ArcheioProcess(tmp / "stderr.log", **env) as server:
        yield server


def test_counts_from_two_workers_add_up_on_one_admin_port(two_workers: ArcheioProcess) -> None:
    server = two_workers
    before = scrape(server)
    plan = (
        [(blob_url(server), xff(AWS_EU_WEST_3))] * 30  # in the eu-west-3 mirror
        + [(blob_url(server), xff(GOOGLE_CLOUD))] * 10  # Google: always upstream
        + [(blob_url(server, MISSING_BLOB), xff(NOBODY))] * 4  # CDN checked, missing: upstream
        + [(f"{server.url}/v2/pause/manifests/3.10", xff(AWS_EU_WEST_3))] * 8
        + [(f"{server.url}/v2/", {})] * 5
    )
    statuses = requests_on_new_connections(iter(plan))
    assert statuses.count(307) == 52 and statuses.count(200) == 5

    def grew(name: str, **labels: str) -> float:
        return total(scrape(server), name, **labels) - total(before, name, **labels)

    # Workers publish their counters once a second: poll until all arrived.
    wait_for(lambda: grew("archeio_requests_total") == len(plan), what="all requests in /metrics")
    after = scrape(server)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("archeio_requests_total", kind="blob", decision="mirror", status="307") == 30
    assert delta("archeio_requests_total", kind="blob", decision="upstream", status="307") == 14
    assert delta("archeio_requests_total", kind="manifest", decision="upstream", status="307") == 8
    assert delta("archeio_requests_total", kind="other", decision="local", status="200") == 5
    assert delta("archeio_blob_decisions_total", cloud="AWS", region="eu-west-3", decision="mirror") == 30
    assert delta("archeio_blob_decisions_total", cloud="GCP", decision="upstream") == 10
    assert delta("archeio_blob_decisions_total", cloud="none", region="none", decision="upstream") == 4
    # Each worker asks each mirror at most once per blob; the rest are cache answers.
    hits = delta("archeio_existence_checks_total", outcome="hit")
    misses = delta("archeio_existence_checks_total", outcome="miss")
    assert 1 <= hits <= 2 and 1 <= misses <= 2
    assert delta("archeio_existence_check_seconds_count", outcome="hit") == hits
    # Both workers served, and their shares add up to the whole.
    per_worker = {labels["worker"]: value for name, labels, value in after if name == "archeio_worker_requests_total"}
    assert set(per_worker) == {"0", "1"} and all(v > 0 for v in per_worker.values())
    assert sum(per_worker.values()) == total(after, "archeio_requests_total")
    assert total(after, "archeio_workers", state="ready") == 2
    assert total(after, "archeio_in_flight_requests") == 0
    # Every answer counted is an observation of the latency histogram, summed over the workers.
    for kind, status_class, count in (("blob", "3xx", 44), ("manifest", "3xx", 8), ("other", "2xx", 5)):
        labels = {"kind": kind, "status_class": status_class}
        assert delta("archeio_request_duration_seconds_count", **labels) == count
        assert delta("archeio_request_duration_seconds_bucket", le="+Inf", **labels) == count


def test_build_and_processes_are_reported_for_each_worker_and_the_supervisor(
    engine: str, two_workers: ArcheioProcess
) -> None:
    samples = scrape(two_workers)
    builds = [labels for name, labels, value in samples if name == "archeio_build_info" and value == 1]
    assert len(builds) == 1 and builds[0]["engine"] == engine
    assert builds[0]["python"] == ".".join(map(str, sys.version_info[:3]))
    workers = {labels["worker"] for name, labels, _ in samples if name == "process_resident_memory_bytes"}
    assert workers == {"0", "1", "supervisor"}
    for worker in workers:
        assert total(samples, "process_resident_memory_bytes", worker=worker) > 1_000_000
        assert total(samples, "process_open_fds", worker=worker) >= 3
        assert 0 < total(samples, "process_start_time_seconds", worker=worker) <= time.time()
    # Each worker measures its loop's lag and its collections from the start (loopstats.py).
    deadline = time.monotonic() + 10
    while total(samples, "archeio_event_loop_lag_seconds_count") == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        samples = scrape(two_workers)
    assert total(samples, "archeio_event_loop_lag_seconds_count") > 0
    # The workers started after the supervisor that started them.
    assert total(samples, "process_start_time_seconds", worker="0") >= total(
        samples, "process_start_time_seconds", worker="supervisor") - 1


def test_range_data_is_reported_per_cloud_and_worker(two_workers: ArcheioProcess) -> None:
    samples = scrape(two_workers)
    for worker in ("0", "1"):
        assert total(samples, "archeio_ranges_prefixes", cloud="AWS", worker=worker) > 1000
        assert total(samples, "archeio_ranges_prefixes", cloud="GCP", worker=worker) > 10
        assert total(samples, "archeio_ranges_age_seconds", cloud="AWS", worker=worker) > 0


def test_health_endpoints_answer_on_the_admin_port(two_workers: ArcheioProcess) -> None:
    assert admin_get(two_workers, "/healthz") == (200, b"ok\n")
    status, body = admin_get(two_workers, "/readyz")
    assert status == 200 and b"2 of 2" in body


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
def test_admin_paths_are_not_on_the_public_port(two_workers: ArcheioProcess, path: str) -> None:
    status, _, body = http_get(two_workers.url + path)
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "NOT_FOUND"


def test_access_log_is_off_by_default(two_workers: ArcheioProcess) -> None:
    assert http_get(blob_url(two_workers), xff(AWS_EU_WEST_3))[0] == 307
    entries = two_workers.log_entries()
    assert entries, "the server logs its start-up"
    assert all(e["logger"] != "archeio.access" for e in entries)
    assert all(e["severity"] in ("DEBUG", "INFO", "WARNING", "ERROR") for e in entries)


def test_admin_port_zero_turns_it_off(tmp_path: Path) -> None:
    server = ArcheioProcess(tmp_path / "stderr.log", ARCHEIO_ADMIN_PORT="0")
    try:
        server.start(admin=False)
        assert admin_get(server, "/healthz")[0] == 0  # nothing listens on the usual admin port
        assert http_get(server.url + "/healthz")[0] == 404
    finally:
        server.stop()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_admin_port_in_use_stops_start_up_naming_it(tmp_path: Path, workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ArcheioProcess(tmp_path / "stderr.log", ARCHEIO_WORKERS=workers)
        server.env["ARCHEIO_ADMIN_PORT"] = str(port)
        result = subprocess.run([sys.executable, "-m", "archeio", "serve"], env=server.env,
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("archeio: cannot serve") and f"admin port 127.0.0.1:{port}" in last, result.stderr
    assert "killing" not in result.stderr  # the workers were stopped, not killed
