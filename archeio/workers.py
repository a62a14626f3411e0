"""Several worker processes on one public port: SO_REUSEPORT and a small supervisor.

Why SO_REUSEPORT and not gunicorn: the public port is our own asyncio
protocol (protocol.py), not an aiohttp application, so gunicorn's aiohttp
worker would bring a second HTTP stack to bypass; and gunicorn's workers
share one listening socket, so whichever worker wakes first takes the
connection and one busy worker can keep winning. With SO_REUSEPORT each
worker has its own listening socket and the kernel spreads new connections
over them by a hash of the addresses. What it costs: a keep-alive
connection stays on the worker it landed on, and connections still queued
on a worker's socket when that worker closes it are reset (so shutdown
first drains, see server.py).

The supervisor
- reserves the port with a bound, not listening, SO_REUSEPORT socket (it
  resolves port 0 once and receives no connections), then starts N workers
  (`spawn`: fresh interpreters, no state forked from a running loop) that
  each bind and listen on the same port;
- serves the admin port for all of them: every worker writes a snapshot of
  its counters to `<dir>/worker-<n>.json` once a second, the supervisor sums
  them on scrape (metrics.py), and keeps the counters of workers that died
  so that totals never go down;
- forwards SIGHUP (range reload) to the workers; on SIGTERM fails /readyz at
  once and forwards SIGTERM (each worker drains, then finishes in-flight
  requests), waits for them and exits;
- restarts a worker that exits unexpectedly (with a growing delay when it
  keeps dying), and stops everything if a worker fails at start-up with a
  configuration error (exit status 2), which a restart cannot fix.

Workers watch their parent and stop when it is gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

import uvloop

from iprange import RangeFileError

from .admin import start_admin
from .config import Settings
from .logs import setup_logging
from .metrics import Snapshot, read_snapshot, retire
from .server import Server, bind, run

log = logging.getLogger("archeio.workers")

# Exit status of a worker that cannot start because of its configuration.
CONFIG_ERROR = 2
# A worker dying sooner than this after its start is restarted with a delay.
_QUICK_DEATH = 5.0
_MAX_RESTART_DELAY = 30.0
_MONITOR_INTERVAL = 0.2


def serve(settings: Settings) -> None:
    """Serve with `settings.workers` processes (one: everything in this process)."""
    if settings.workers == 1:
        run(settings)
        return
    status = Supervisor(settings).run()
    if status:
        raise SystemExit(status)


def reserve_port(settings: Settings) -> socket.socket:
    """A bound, not listening, SO_REUSEPORT socket: holds the port, gets no connections."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((settings.host, settings.port))
    return sock


def worker_main(settings: Settings, worker: str, snapshot_dir: str) -> None:
    """Entry point of a worker process."""
    # A SIGHUP before the loop's handler is installed must not kill us.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    setup_logging(settings.log_level, settings.access_log > 0)
    server = Server(settings, worker=worker, snapshot_path=Path(snapshot_dir) / f"worker-{worker}.json")
    try:
        uvloop.run(_run_worker(server, bind(settings, reuse_port=True)))
    except (RangeFileError, OSError) as exc:
        log.error("worker %s cannot start: %s", worker, exc)
        raise SystemExit(CONFIG_ERROR) from None


async def _run_worker(server: Server, sock: socket.socket) -> None:
    parent = os.getppid()

    async def stop_with_parent() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        log.warning("supervisor %s is gone: stopping", parent)
        server.stopping.set()

    watcher = asyncio.get_running_loop().create_task(stop_with_parent())
    try:
        await server.run(sock)
    finally:
        watcher.cancel()


@dataclasses.dataclass
class _Slot:
    """One worker position: the process in it now and its restart history."""

    name: str
    process: BaseProcess | None = None
    started: float = 0.0
    restart_delay: float = 0.0
    restart_at: float = 0.0


class Supervisor:
    """Starts, watches and stops the workers; serves their admin port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slots = [_Slot(str(i)) for i in range(settings.workers)]
        self.stopping = False
        self.restarts = 0
        self.retired: list[Snapshot] = []
        self.snapshot_dir = Path(tempfile.mkdtemp(prefix="archeio-workers-"))
        self._context = multiprocessing.get_context("spawn")
        self._stop = asyncio.Event()
        self._status = 0
        self._all_started = False

    # -- the admin port's view (metrics.MetricsSource) --------------------

    def _snapshot_path(self, slot: _Slot) -> Path:
        return self.snapshot_dir / f"worker-{slot.name}.json"

    def _running(self) -> list[_Slot]:
        return [s for s in self.slots if s.process is not None and s.process.is_alive()]

    def snapshots(self) -> list[Snapshot]:
        live = [read_snapshot(self._snapshot_path(s)) for s in self._running()]
        return [s for s in live if s is not None] + self.retired

    def readiness(self) -> tuple[bool, str]:
        """Ready once every worker has started; then while at least one is ready."""
        if self.stopping:
            return False, "shutting down"
        ready = self.worker_counts()["ready"]
        self._all_started = self._all_started or ready == len(self.slots)
        if not self._all_started:
            return False, f"starting: {ready} of {len(self.slots)} workers ready"
        if ready == 0:
            return False, "no worker ready"
        return True, f"ready: {ready} of {len(self.slots)} workers"

    def worker_counts(self) -> dict[str, int]:
        running = self._running()
        snaps = (read_snapshot(self._snapshot_path(s)) for s in running)
        return {
            "configured": len(self.slots),
            "running": len(running),
            "ready": sum(1 for snap in snaps if snap and snap.get("ready")),
            "restarts": self.restarts,
        }

    # -- lifecycle ----------------------------------------------------------

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; the exit status."""
        reserved = reserve_port(self.settings)
        # Port 0 means "any": every worker must bind the one the kernel chose.
        self.settings = dataclasses.replace(self.settings, port=reserved.getsockname()[1])
        try:
            uvloop.run(self._supervise())
        finally:
            reserved.close()
            shutil.rmtree(self.snapshot_dir, ignore_errors=True)
        return self._status

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._begin_stop)
        loop.add_signal_handler(signal.SIGHUP, self._signal_workers, signal.SIGHUP)
        for slot in self.slots:
            self._start(slot)
        log.info(
            "supervising %d workers on %s:%s", len(self.slots), self.settings.host, self.settings.port,
            extra={"fields": {"pids": [s.process.pid for s in self.slots if s.process]}},
        )
        admin = None
        try:
            admin = await start_admin(self.settings.admin_host, self.settings.admin_port, self)
            while not self._stop.is_set():
                self._watch()
                try:
                    await asyncio.wait_for(self._stop.wait(), _MONITOR_INTERVAL)
                except TimeoutError:
                    pass
        finally:
            self._begin_stop()  # also when the admin port could not start
            await self._wait_for_workers()
            self._kill_remaining()
            if admin is not None:
                await admin.cleanup()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            log.info("stopped")

    def _start(self, slot: _Slot) -> None:
        self._snapshot_path(slot).unlink(missing_ok=True)
        process = self._context.Process(
            target=worker_main, args=(self.settings, slot.name, str(self.snapshot_dir)),
            name=f"archeio-worker-{slot.name}",
        )
        process.start()
        slot.process, slot.started = process, time.monotonic()

    def _watch(self) -> None:
        """Restart workers that exited; give up on configuration errors."""
        now = time.monotonic()
        for slot in self.slots:
            process = slot.process
            if process is None:
                if now >= slot.restart_at:
                    self.restarts += 1
                    self._start(slot)
                continue
            if process.is_alive():
                continue
            code = process.exitcode
            last = read_snapshot(self._snapshot_path(slot))
            if last is not None:
                self.retired.append(retire(last))
            slot.process = None
            if code == CONFIG_ERROR and last is None:
                log.error("worker %s failed to start (exit %s): stopping", slot.name, code)
                self._status = CONFIG_ERROR
                self._begin_stop()
                return
            quick = now - slot.started < _QUICK_DEATH
            slot.restart_delay = min(max(slot.restart_delay * 2, 0.5), _MAX_RESTART_DELAY) if quick else 0.0
            slot.restart_at = now + slot.restart_delay
            log.error("worker %s (pid %s) exited with %s: restarting in %.1f s",
                      slot.name, process.pid, code, slot.restart_delay)

    def _signal_workers(self, sig: int) -> None:
        for slot in self._running():
            assert slot.process is not None and slot.process.pid is not None
            os.kill(slot.process.pid, sig)

    def _begin_stop(self) -> None:
        """SIGTERM: not ready from now on; the workers drain and stop."""
        if self.stopping:
            return
        self.stopping = True
        log.info("shutting down %d workers", len(self._running()))
        self._signal_workers(signal.SIGTERM)
        self._stop.set()

    async def _wait_for_workers(self) -> None:
        limit = time.monotonic() + self.settings.drain_delay + self.settings.grace_period + 5.0
        while self._running() and time.monotonic() < limit:
            await asyncio.sleep(0.05)

    def _kill_remaining(self) -> None:
        for slot in self._running():
            assert slot.process is not None
            log.error("worker %s did not stop in time: killing it", slot.name)
            slot.process.kill()
        for slot in self.slots:
            if slot.process is not None:
                slot.process.join(timeout=5)
