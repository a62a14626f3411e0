"""The worker supervisor: restarts a dead worker without losing its counts; gives up on bad configuration.

Real `archeio serve --workers 2` processes; a worker is killed with SIGKILL
by its PID (as the kernel's OOM killer would), and the admin port must show
the restart, both workers ready again, and request totals that did not go
down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ranges_dir
from .ops_support import ArcheioProcess, http_get, scrape, total, wait_for

# Every test here runs on each HTTP engine (tests/engines.py).
pytestmark = pytest.mark.usefixtures("engine")


def _worker_pids(server: ArcheioProcess) -> list[int]:
    (started,) = [e for e in server.log_entries() if e["message"].startswith("supervising")]
    return list(started["pids"])


def test_killed_worker_is_restarted_and_its_counts_are_kept(tmp_path: Path) -> None:
    env = {"ARCHEIO_WORKERS": "2", "ARCHEIO_RANGES_DIR": str(ranges_dir() or "")}
    with ArcheioProcess(tmp_path / "stderr.log", **env) as server:
        for _ in range(20):
            assert http_get(f"{server.url}/v2/")[0] == 200
        wait_for(lambda: total(scrape(server), "archeio_requests_total") == 20, what="20 requests counted")
        victim = _worker_pids(server)[0]

        os.kill(victim, signal.SIGKILL)

        wait_for(lambda: total(scrape(server), "archeio_worker_restarts_total") == 1, what="a restart")
        wait_for(lambda: total(scrape(server), "archeio_workers", state="ready") == 2, what="2 ready workers")
        assert total(scrape(server), "archeio_requests_total") == 20
        assert http_get(f"{server.url}/v2/")[0] == 200
        assert any("exited with -9" in e["message"] for e in server.log_entries())


def test_worker_configuration_error_stops_the_supervisor_with_status_2(tmp_path: Path) -> None:
    ranges = tmp_path / "ranges"
    ranges.mkdir()
    (ranges / "aws-ip-ranges.json").write_text("not json")
    server = ArcheioProcess(tmp_path / "stderr.log", ARCHEIO_WORKERS="2", ARCHEIO_RANGES_DIR=str(ranges))
    result = subprocess.run([sys.executable, "-m", "archeio", "serve"], env=server.env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot start" in result.stderr and "aws-ip-ranges.json" in result.stderr
