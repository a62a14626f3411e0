"""The worker supervisor: restarts a dead worker without losing its counts; gives up on bad configuration.

Real `archeio serve --workers 2` processes; a worker is killed with SIGKILL
by its PID (as the kernel's OOM killer would), and the admin port must show
the restart, both workers ready again, and request totals that did not go
down.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import RANGES_FIXTURES
from .ops_support import ArcheioProcess, http_get, scrape, total, wait_for

# Every test here runs on each HTTP engine (tests/engines.py).
pytestmark = pytest.mark.usefixtures("engine")


def _worker_pids(server: ArcheioProcess) -> list[int]:
    (started,) = [e for e in server.log_entries() if e["message"].startswith("supervising")]
    return list(started["pids"])


def test_killed_worker_is_restarted_and_its_counts_are_kept(tmp_path: Path) -> None:
    env = {"ARCHEIO_WORKERS": "2"}
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
    shutil.copy(RANGES_FIXTURES / "gcp-cloud.json", ranges)  # required: without it no worker would start
    server = ArcheioProcess(tmp_path / "stderr.log", ARCHEIO_WORKERS="2", ARCHEIO_RANGES_DIR=str(ranges))
    result = subprocess.run([sys.executable, "-m", "archeio", "serve"], env=server.env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot start" in result.stderr and "aws-ip-ranges.json" in result.stderr


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def _catches(pid: int, sig: int) -> bool:
    """Has the process a handler of its own for `sig` (SigCgt in /proc)?"""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (sig - 1) & 1)


def test_sighup_at_every_moment_of_start_up_kills_nothing_and_is_acted_on(tmp_path: Path) -> None:
    # SIGHUP every few milliseconds, to the supervisor from the moment it
    # handles the signal at all, and to each worker from the moment it
    # exists, until both workers are ready, and a while after. A reload
    # needs a directory to re-read: the small files of tests/data/ranges.
    env = {"ARCHEIO_WORKERS": "2", "ARCHEIO_RANGES_DIR": str(RANGES_FIXTURES)}
    server = ArcheioProcess(tmp_path / "stderr.log", **env)
    server.process = subprocess.Popen(
        [sys.executable, "-m", "archeio", "serve"], env=server.env,
        stdout=subprocess.DEVNULL, stderr=open(server.log_path, "wb"),  # noqa: SIM115 - closed with the process
    )
    pid = server.process.pid
    try:
        wait_for(lambda: _catches(pid, signal.SIGHUP) or server.process.poll() is not None,
                 what="the supervisor to handle SIGHUP")
        sent = 0
        ready_since = None
        give_up = time.monotonic() + 60
        while ready_since is None or time.monotonic() - ready_since < 1.0:
            assert server.process.poll() is None, server.log()
            assert time.monotonic() < give_up, f"not ready after 60 s:\n{server.log()}"
            for target in [pid, *_children(pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, signal.SIGHUP)
                    sent += 1
            if ready_since is None and http_get(f"{server.admin_url}/readyz", timeout=1)[0] == 200:
                ready_since = time.monotonic()
            time.sleep(0.005)
        samples = scrape(server)
        assert total(samples, "archeio_worker_restarts_total") == 0, server.log()
        assert total(samples, "archeio_workers", state="ready") == 2
        # Held reloads were done once the workers could take them.
        wait_for(lambda: total(scrape(server), "archeio_ranges_reloads_total") > 0, what="a reload")
        assert http_get(f"{server.url}/v2/")[0] == 200
        print(f"\n{sent} SIGHUPs during start-up")
    finally:
        assert server.stop() == 0, server.log()
