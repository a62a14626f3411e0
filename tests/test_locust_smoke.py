"""The load test's locustfile keeps working: a few seconds of it against the real server.

Runs the real `archeio serve` command and the stand-in bucket
(benchmarks/standin_bucket.py) on loopback, then headless Locust with
benchmarks/locustfile.py. A smoke run, not a benchmark: nothing here is
timed, it only proves the realistic pulls still get exactly the answers the
locustfile expects, and that the locustfile does notice a wrong redirect.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import harness  # noqa: E402

MISSING_SHARE = "0.2"  # high, so a few seconds surely exercise the fallback path


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, dict[str, str]]]:
    """(server port, bucket port, settings) of a running server and stand-in bucket."""
    tmp = tmp_path_factory.mktemp("locust-smoke")
    bucket_port, port = harness.free_port(), harness.free_port()
    env = harness.local_mirrors_env(tmp, bucket_port)
    env["ARCHEIO_RANGES_DIR"] = str(harness.shared_ranges_dir() or "")
    env.update({"ARCHEIO_LOG_LEVEL": "warning", "BENCH_MISSING_SHARE": MISSING_SHARE, "BENCH_USER_RATE": "20",
                # A HEAD that times out on a loaded machine would (rightly) send the
                # blob upstream; this test is about answers, not timing.
                "ARCHEIO_HEAD_TIMEOUT": "10"})
    with harness.start_bucket(bucket_port, "--missing-share", MISSING_SHARE, log=tmp / "bucket.log"), \
            harness.start_archeio(env, port, log=tmp / "archeio.log"):
        yield port, bucket_port, env


def test_realistic_pulls_get_every_expected_answer(rig: tuple[int, int, dict[str, str]], tmp_path: Path) -> None:
    port, bucket_port, env = rig
    status, summary, aggregated = harness.run_locust(port, env, users=8, seconds=4, out=tmp_path)
    log = (tmp_path / "locust.log").read_text()
    assert summary["failures"] == 0, summary["failure_examples"]
    assert status == 0, log
    assert summary["requests"] > 50
    assert aggregated["Failure Count"] == "0"
    # The server's existence checks were real HEADs, finding blobs and missing some.
    heads = harness.bucket_counts(bucket_port)
    assert heads.get("200", 0) > 0 and heads.get("404", 0) > 0, heads


def test_a_wrong_redirect_counts_as_a_failure(rig: tuple[int, int, dict[str, str]], tmp_path: Path) -> None:
    port, _, env = rig
    # The locustfile now expects blobs of unknown clients at another default
    # mirror than the server uses: those answers must be counted as failures.
    expecting_elsewhere = {**env, "DEFAULT_AWS_BASE_URL": "http://127.0.0.1:1/elsewhere",
                           "BENCH_CLIENTS": "unknown=1"}
    status, summary, _ = harness.run_locust(port, expecting_elsewhere, users=4, seconds=3, out=tmp_path)
    assert status != 0
    assert summary["failures"] > 0
    assert any("expected 307 'http://127.0.0.1:1/elsewhere/" in example for example in summary["failure_examples"])
