"""The load test's locustfile keeps working: a few seconds of it against the real server.

Runs the real `archeio serve` command (access lines on, so its own log can
be replayed) and the stand-in bucket (benchmarks/standin_bucket.py) on
loopback, then headless Locust with benchmarks/locustfile.py: in one
process, in distributed mode (`--processes 2`: a master and two workers),
and replaying a recorded access log. Smoke runs, not benchmarks: nothing
here is timed. They prove the realistic pulls still get exactly the
answers the locustfile expects, that a wrong redirect is noticed, that
the master's exact percentiles are those of every worker's samples, and
that a replay sends every recorded request once, from its recorded
client, with the expected answer.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import harness  # noqa: E402

MISSING_SHARE = "0.2"  # high, so a few seconds surely exercise the fallback path


@dataclass(frozen=True)
class Rig:
    port: int
    bucket_port: int
    env: dict[str, str]
    server_log: Path  # the server's stderr: JSON lines, access lines among them


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """A running server (every request logged) and stand-in bucket."""
    tmp = tmp_path_factory.mktemp("locust-smoke")
    bucket_port, port = harness.free_port(), harness.free_port()
    env = harness.local_mirrors_env(tmp, bucket_port)
    env["ARCHEIO_RANGES_DIR"] = ""  # the embedded data, for the server and the mix alike
    env.update({"ARCHEIO_LOG_LEVEL": "warning", "ARCHEIO_ACCESS_LOG": "1", "BENCH_MISSING_SHARE": MISSING_SHARE,
                "BENCH_USER_RATE": "20",
                # A HEAD that times out on a loaded machine would (rightly) send the
                # blob upstream; this test is about answers, not timing.
                "ARCHEIO_HEAD_TIMEOUT": "10"})
    with harness.start_bucket(bucket_port, "--missing-share", MISSING_SHARE, log=tmp / "bucket.log"), \
            harness.start_archeio(env, port, log=tmp / "archeio.log"):
        yield Rig(port, bucket_port, env, tmp / "archeio.log")


def nearest_rank(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def access_lines(log: Path, offset: int) -> list[dict[str, object]]:
    """The server's access lines written after byte `offset` of its log."""
    with open(log, "rb") as text:
        text.seek(offset)
        docs = [json.loads(line) for line in text.read().decode().splitlines() if line.startswith("{")]
    return [d for d in docs if d.get("logger") == "archeio.access"]


def test_realistic_pulls_get_every_expected_answer(rig: Rig, tmp_path: Path) -> None:
    status, summary, aggregated = harness.run_locust(rig.port, rig.env, users=8, seconds=4, out=tmp_path)
    log = (tmp_path / "locust.log").read_text()
    assert summary["failures"] == 0, summary["failure_examples"]
    assert status == 0, log
    assert summary["requests"] > 50
    assert aggregated["Failure Count"] == "0"
    # The server's existence checks were real HEADs, finding blobs and missing some.
    heads = harness.bucket_counts(rig.bucket_port)
    assert heads.get("200", 0) > 0 and heads.get("404", 0) > 0, heads


def test_a_wrong_redirect_counts_as_a_failure(rig: Rig, tmp_path: Path) -> None:
    # The locustfile now expects blobs of unknown clients at another default
    # mirror than the server uses: those answers must be counted as failures.
    expecting_elsewhere = {**rig.env, "DEFAULT_AWS_BASE_URL": "http://127.0.0.1:1/elsewhere",
                           "BENCH_CLIENTS": "unknown=1"}
    status, summary, _ = harness.run_locust(rig.port, expecting_elsewhere, users=4, seconds=3, out=tmp_path)
    assert status != 0
    assert summary["failures"] > 0
    assert any("expected 307 'http://127.0.0.1:1/elsewhere/" in example for example in summary["failure_examples"])


def test_distributed_percentiles_are_those_of_every_workers_samples(rig: Rig, tmp_path: Path) -> None:
    samples_dir = tmp_path / "samples"
    env = {**rig.env, "BENCH_SAMPLES_DIR": str(samples_dir)}
    status, summary, aggregated = harness.run_locust(rig.port, env, users=8, seconds=4, out=tmp_path, processes=2)
    assert status == 0 and summary["failures"] == 0, summary.get("failure_examples")
    # Each worker wrote the raw samples it sent; the master wrote the only summary.
    per_worker = [json.loads(path.read_text())["latencies"] for path in sorted(samples_dir.glob("samples-*.json"))]
    assert len(per_worker) == 2 and all(per_worker), [len(s) for s in per_worker]
    everything = [x for samples in per_worker for x in samples]
    assert summary["processes"] == 2 and summary["workers_missing"] == []
    assert summary["requests"] == len(everything) == int(aggregated["Request Count"])
    for key, p in (("p50_ms", 50), ("p95_ms", 95), ("p99_ms", 99), ("p999_ms", 99.9)):
        assert summary[key] == round(nearest_rank(everything, p), 3), key
    assert summary["max_ms"] == round(max(everything), 3)


def test_distributed_workers_failures_reach_the_master(rig: Rig, tmp_path: Path) -> None:
    expecting_elsewhere = {**rig.env, "DEFAULT_AWS_BASE_URL": "http://127.0.0.1:1/elsewhere",
                           "BENCH_CLIENTS": "unknown=1"}
    status, summary, _ = harness.run_locust(rig.port, expecting_elsewhere, users=4, seconds=3, out=tmp_path,
                                            processes=2)
    assert status != 0
    assert summary["processes"] == 2 and summary["failures"] > 0
    assert all(worker["failures"] > 0 for worker in summary["per_process"])
    assert any("expected 307 'http://127.0.0.1:1/elsewhere/" in example for example in summary["failure_examples"])


def test_replayed_access_log_repeats_every_request_from_its_client(rig: Rig, tmp_path: Path) -> None:
    # Record: a few seconds of synthetic pulls, logged by the server itself.
    start = rig.server_log.stat().st_size
    harness.run_locust(rig.port, rig.env, users=6, seconds=3, out=tmp_path / "record")
    recorded_size = rig.server_log.stat().st_size
    recorded = access_lines(rig.server_log, start)
    assert len(recorded) > 30
    log = tmp_path / "access.log"
    with open(rig.server_log, "rb") as text:
        text.seek(start)
        log.write_bytes(text.read(recorded_size - start))

    # Replay it twice as fast, split over two worker processes by client.
    replay_env = {**rig.env, "BENCH_REPLAY": str(log), "BENCH_REPLAY_SPEEDUP": "2"}
    status, summary, aggregated = harness.run_locust(rig.port, replay_env, users=16, seconds=5,
                                                     out=tmp_path / "replay", processes=2)
    assert status == 0 and summary["failures"] == 0, summary.get("failure_examples")
    assert summary["requests"] == len(recorded) == int(aggregated["Request Count"])
    assert "lateness_ms" in summary

    # The server saw the same requests from the same clients again.
    def requests(lines: list[dict[str, object]]) -> Counter[tuple[object, ...]]:
        return Counter((r["requestMethod"], r["requestUrl"], r["remoteIp"])  # type: ignore[index]
                       for r in (line["httpRequest"] for line in lines))

    assert requests(access_lines(rig.server_log, recorded_size)) == requests(recorded)


def test_replayed_plain_list_checks_what_it_cannot_predict(rig: Rig, tmp_path: Path) -> None:
    blob = "sha256:" + "5" * 64
    listing = tmp_path / "requests.txt"
    listing.write_text("\n".join([
        "# method target client",
        "GET /v2/ 35.180.1.1",
        f"GET /v2/pause/blobs/{blob} 35.180.1.1",  # AWS eu-west-3: the mirror or upstream, predicted
        "HEAD /v2/pause/manifests/3.10 35.220.26.1",
        "GET /v2/pause/manifests/3.10?ns=k8s.io 192.168.0.1",  # a query: not predicted, must not fail
        "GET /v2/Pause/manifests/3.10 192.168.0.1",  # outside the grammar: a 400, not a 5xx
        "DELETE /v2/pause/manifests/3.10 192.168.0.1",  # 405
    ]) + "\n")
    env = {**rig.env, "BENCH_REPLAY": str(listing), "BENCH_REPLAY_RATE": "20"}
    status, summary, aggregated = harness.run_locust(rig.port, env, users=4, seconds=3, out=tmp_path)
    assert status == 0 and summary["failures"] == 0, summary.get("failure_examples")
    assert summary["requests"] == 6 == int(aggregated["Request Count"])
