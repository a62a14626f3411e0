"""SIGTERM as an orchestrator sends it: not ready at once, drain, finish, exit 0.

A real `archeio serve` (one process, and a supervisor with two workers)
holds a blob request in flight (its mirror HEAD is held by the stand-in
bucket) when SIGTERM arrives. Each step is observed, in order, by polling:
/readyz fails while the public port still answers; then the port stops
accepting; the held request still gets its redirect once the mirror
answers; the process exits 0 without leaking its client session.
"""

from __future__ import annotations

import signal
import socket
import threading
from pathlib import Path

import pytest

from .conftest import AWS_EU_WEST_3
from .ops_support import (
    BLOB,
    ArcheioProcess,
    ThreadedBucket,
    admin_get,
    blob_url,
    http_get,
    wait_for,
    write_mirrors,
    xff,
)

# Every test here runs on each HTTP engine (tests/engines.py).
pytestmark = pytest.mark.usefixtures("engine")


def _refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except OSError:
        return True


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_finishes_in_flight_and_exits_0(tmp_path: Path, workers: int) -> None:
    with ThreadedBucket() as bucket:
        env = {
            "ARCHEIO_WORKERS": str(workers),
            "ARCHEIO_MIRRORS_FILE": str(write_mirrors(tmp_path / "m.toml", {"eu-west-3": bucket.base("p")})),
            # Long enough to observe the drain on a busy machine; the test
            # does not wait it out idly, it polls for its end.
            "ARCHEIO_DRAIN_DELAY": "5",
            "ARCHEIO_GRACE_PERIOD": "30",
            "ARCHEIO_HEAD_TIMEOUT": "60",
        }
        with ArcheioProcess(tmp_path / "stderr.log", **env) as server:
            bucket.hold()
            in_flight: list[tuple[int, dict[str, str], bytes]] = []
            request = threading.Thread(
                target=lambda: in_flight.append(http_get(blob_url(server), xff(AWS_EU_WEST_3), timeout=60))
            )
            request.start()
            wait_for(lambda: sum(bucket.heads.values()) == 1, what="the mirror HEAD to be held")

            server.signal(signal.SIGTERM)
            wait_for(lambda: admin_get(server, "/readyz")[0] == 503, what="/readyz to fail")
            # Draining: not ready, but still serving new connections.
            assert http_get(f"{server.url}/v2/pause/manifests/3.10")[0] == 307
            assert in_flight == []

            wait_for(lambda: _refuses_connections(server.port), what="the port to stop accepting")
            assert in_flight == []
            bucket.release()
            request.join(timeout=60)
            status, headers, _ = in_flight[0]
            assert status == 307
            assert headers["Location"] == f"{bucket.base('p')}/containers/images/{BLOB}"

            assert server.process is not None
            assert server.process.wait(timeout=60) == 0
        log = server.log()
        assert "Unclosed" not in log and "Traceback" not in log, log
