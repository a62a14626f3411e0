"""Throughput of `archeio serve` with 1 and N worker processes, and a reload under load.

Runs the real command on loopback ports with the embedded range data written
out as the providers' files (`iprange export`, so a SIGHUP has files to re-read), drives
it with wrk (Debian package `wrk`) for a few seconds per case, and prints
requests per second and the per-worker split read from the admin port's
/metrics. A last case sends SIGHUP (a range reload) in the middle of a run
and prints wrk's error count and latency tail for that run.

    .venv/bin/python benchmarks/ops_workers.py [--seconds 5] [--workers 1 2]

Figures depend on the machine: on a 2-core machine wrk itself needs one
core, so two workers cannot double the rate there.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from iprange.export import export

MANIFEST = "/v2/pause/manifests/3.10"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(workers: int, ranges: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    port, admin = free_port(), free_port()
    env = dict(os.environ, PORT=str(port), ARCHEIO_HOST="127.0.0.1", ARCHEIO_ADMIN_HOST="127.0.0.1",
               ARCHEIO_ADMIN_PORT=str(admin), ARCHEIO_WORKERS=str(workers),
               ARCHEIO_RANGES_DIR=str(ranges))
    process = subprocess.Popen([sys.executable, "-m", "archeio", "serve"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2):
                return process, port, admin
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("archeio did not become ready")


def wrk(port: int, seconds: float) -> str:
    return subprocess.run(
        ["wrk", "-t1", "-c64", f"-d{seconds:g}s", "--latency", f"http://127.0.0.1:{port}{MANIFEST}"],
        capture_output=True, text=True, check=True,
    ).stdout


def per_worker(admin: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r'archeio_worker_requests_total\{worker="(\w+)"\} (\S+)', text)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"wrk -t1 -c64 GET {MANIFEST}, {args.seconds:g} s per case, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="archeio-ops-workers-") as ranges:
        export(Path(ranges))
        for workers in args.workers:
            measure(workers, Path(ranges), args.seconds, reload=workers == max(args.workers))


def measure(workers: int, ranges: Path, seconds: float, reload: bool) -> None:
    """One worker count: its rate and per-worker split, then (`reload`) a run with a SIGHUP in the middle."""
    process, port, admin = start(workers, ranges)
    try:
        wrk(port, 1)  # warm up
        out = wrk(port, seconds)
        rate = re.search(r"Requests/sec:\s+(\S+)", out)
        p99 = re.search(r"99%\s+(\S+)", out)
        time.sleep(1.5)  # workers publish their counters once a second
        print(f"workers={workers}: {rate[1] if rate else '?'} req/s, p99 {p99[1] if p99 else '?'}, "
              f"per worker {per_worker(admin)}")
        if reload:
            timer = threading.Timer(seconds / 2, process.send_signal, (signal.SIGHUP,))
            timer.start()
            out = wrk(port, seconds)
            errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
            p99 = re.search(r"99%\s+(\S+)", out)
            print(f"workers={workers} with a SIGHUP reload mid-run: p99 {p99[1] if p99 else '?'}, "
                  f"errors: {errors[0] if errors else 'none'}")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
