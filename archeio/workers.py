"""Several worker processes on one public port: SO_REUSEPORT and a lean supervisor.

Why SO_REUSEPORT and not gunicorn: the public port is served by our own
engines (archeio/http/), not a WSGI or aiohttp application, so gunicorn
would bring a second stack to bypass; and gunicorn's workers share one
listening socket, so whichever worker wakes first takes the connection and
one busy worker can keep winning. With SO_REUSEPORT each worker has its own
listening socket and the kernel spreads new connections over them by a hash
of the addresses. What it costs: a keep-alive connection stays on the
worker it landed on, and connections still queued on a worker's socket when
that worker closes it are reset (so shutdown first drains, see server.py).

The supervisor serves only the admin port, so it is kept small: the stdlib
event loop (no uvloop), no aiohttp, no metrics library, no multiprocessing
(whose resource tracker is a process of its own). It
- reserves the port with a bound, not listening, SO_REUSEPORT socket (it
  resolves port 0 once and receives no connections), then starts N workers
  as fresh interpreters (`python -m archeio.worker`), each of which binds
  and listens on the same port;
- hands each worker its settings through its stdin, and keeps that pipe
  open: a worker whose stdin ends knows the supervisor is gone and stops;
- reads each worker's snapshot once a second from a pipe of its own (no
  files, so no writable /tmp is needed) and serves the admin port for all
  of them; the counters of workers that died are kept, so totals never go
  down (metrics.retire);
- forwards SIGHUP (range reload) only to workers that report themselves
  ready, holding it for the others until they are; on SIGTERM fails
  /readyz at once and forwards SIGTERM (each worker drains, then finishes
  in-flight requests), waits for them and exits;
- restarts a worker that exits unexpectedly (with a growing delay when it
  keeps dying), and stops everything if a worker fails at start-up with a
  configuration error (exit status 2), which a restart cannot fix; a
  required provider's range file missing (providers.py) is seen before any
  worker starts, by the file's name alone.

Workers start with SIGHUP ignored (an exec keeps an ignored signal), so no
moment of their start-up can be killed by a reload signal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import time

from iprange import RangeFileError

from . import signals
from .admin import start_admin
from .config import Settings
from .metrics import Snapshot, build_info, process_facts, retire
from .providers import files_present, missing_providers
from .sockets import bind

log = logging.getLogger("archeio.workers")

# Exit status of a worker that cannot start because of its configuration.
CONFIG_ERROR = 2
# A worker dying sooner than this after its start is restarted with a delay.
_QUICK_DEATH = 5.0
_MAX_RESTART_DELAY = 30.0
_MONITOR_INTERVAL = 0.2
# The settings a worker reads from its stdin: a length, then a pickle.
SETTINGS_HEADER = struct.Struct("!I")


def serve(settings: Settings) -> None:
    """Serve with `settings.workers` processes (one: everything in this process)."""
    if settings.workers == 1:
        from .server import run

        run(settings)
        return
    if settings.ranges_dir is not None:
        # No worker is started that is known to fail: a required provider's
        # file is missing. Only its name is looked at (the supervisor parses
        # no ranges); what parsing finds fails the workers with status 2.
        problem = missing_providers(settings, files_present(settings.ranges_dir))
        if problem:
            raise RangeFileError(problem)
    status = Supervisor(settings).run()
    if status:
        raise SystemExit(status)


def _ignore_sighup() -> None:
    """Runs in the child between fork and exec: the worker starts immune to SIGHUP."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


class _Reports(asyncio.Protocol):
    """Reads one worker's snapshots: one JSON object a line."""

    def __init__(self, slot: _Slot) -> None:
        self.slot = slot
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            try:
                snap = json.loads(line)
            except ValueError:
                continue
            if isinstance(snap, dict):
                self.slot.snapshot = snap


@dataclasses.dataclass
class _Slot:
    """One worker position: the process in it now and its restart history."""

    name: str
    process: subprocess.Popen[bytes] | None = None
    reports: asyncio.BaseTransport | None = None
    snapshot: Snapshot | None = None
    started: float = 0.0
    restart_delay: float = 0.0
    restart_at: float = 0.0
    reload_pending: bool = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def ready(self) -> bool:
        return self.running and bool(self.snapshot and self.snapshot.get("ready"))


class Supervisor:
    """Starts, watches and stops the workers; serves their admin port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slots = [_Slot(str(i)) for i in range(settings.workers)]
        self.stopping = False
        self.restarts = 0
        self.retired: list[Snapshot] = []
        self._stop = asyncio.Event()
        self._status = 0
        self._all_started = False

    # -- the admin port's view (metrics.MetricsSource) ------------------------------

    def snapshots(self) -> list[Snapshot]:
        live = [s.snapshot for s in self.slots if s.running and s.snapshot is not None]
        # The supervisor's own process, beside its workers (`process_*{worker="supervisor"}`).
        own = {"worker": "supervisor", "process": process_facts(), "build": build_info(self.settings.http)}
        return [*live, own, *self.retired]

    def readiness(self) -> tuple[bool, str]:
        """Ready once every worker has started; then while at least one is ready."""
        if self.stopping:
            return False, "shutting down"
        ready = sum(1 for s in self.slots if s.ready)
        self._all_started = self._all_started or ready == len(self.slots)
        if not self._all_started:
            return False, f"starting: {ready} of {len(self.slots)} workers ready"
        if ready == 0:
            return False, "no worker ready"
        return True, f"ready: {ready} of {len(self.slots)} workers"

    def worker_counts(self) -> dict[str, int]:
        return {
            "configured": len(self.slots),
            "running": sum(1 for s in self.slots if s.running),
            "ready": sum(1 for s in self.slots if s.ready),
            "restarts": self.restarts,
        }

    # -- lifecycle -----------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; the exit status."""
        reserved = bind(self.settings, reuse_port=True, listen=False)
        # Port 0 means "any": every worker must bind the one the kernel chose.
        self.settings = dataclasses.replace(self.settings, port=reserved.getsockname()[1])
        try:
            asyncio.run(self._supervise())
        finally:
            reserved.close()
        return self._status

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._begin_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        for slot in self.slots:
            await self._start(slot)
        log.info(
            "supervising %d workers on %s:%s", len(self.slots), self.settings.host, self.settings.port,
            extra={"fields": {"pids": [s.process.pid for s in self.slots if s.process]}},
        )
        # Signals that came in before the handlers were installed.
        if signals.take(signal.SIGHUP):
            self._reload()
        if signals.take(signal.SIGTERM):
            self._begin_stop()
        admin = None
        try:
            admin = await start_admin(self.settings.admin_host, self.settings.admin_port, self)
            while not self._stop.is_set():
                await self._watch()
                try:
                    await asyncio.wait_for(self._stop.wait(), _MONITOR_INTERVAL)
                except TimeoutError:
                    pass
        finally:
            self._begin_stop()  # also when the admin port could not start
            await self._wait_for_workers()
            self._kill_remaining()
            if admin is not None:
                await admin.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            signals.hold()  # a late signal must not kill the supervisor while it exits
            log.info("stopped")

    async def _start(self, slot: _Slot) -> None:
        read_end, write_end = os.pipe()
        try:
            process = subprocess.Popen(
                # -P: the working directory does not shadow the installed
                # package (`python -m` would put it first on sys.path).
                [sys.executable, "-P", "-m", "archeio.worker", slot.name, str(write_end)],
                stdin=subprocess.PIPE, pass_fds=(write_end,), preexec_fn=_ignore_sighup,
            )
        finally:
            os.close(write_end)
        assert process.stdin is not None
        payload = pickle.dumps(self.settings)
        process.stdin.write(SETTINGS_HEADER.pack(len(payload)) + payload)
        process.stdin.flush()  # and kept open: its end tells the worker we are gone
        slot.snapshot = None
        slot.reports, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: _Reports(slot), os.fdopen(read_end, "rb", buffering=0)
        )
        slot.process, slot.started = process, time.monotonic()

    async def _watch(self) -> None:
        """Restart workers that exited; give up on configuration errors; deliver held reloads."""
        now = time.monotonic()
        for slot in self.slots:
            process = slot.process
            if process is None:
                if now >= slot.restart_at and not self.stopping:
                    self.restarts += 1
                    await self._start(slot)
                continue
            code = process.poll()
            if code is None:
                if slot.reload_pending and slot.ready:
                    slot.reload_pending = False
                    process.send_signal(signal.SIGHUP)
                continue
            last = slot.snapshot
            self._release(slot)
            if last is not None:
                self.retired.append(retire(last))
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

    def _release(self, slot: _Slot) -> None:
        """Forget an exited worker's process and pipes."""
        if slot.reports is not None:
            slot.reports.close()
        if slot.process is not None and slot.process.stdin is not None:
            try:
                slot.process.stdin.close()
            except OSError:
                pass
        slot.process, slot.reports, slot.snapshot = None, None, None

    def _reload(self) -> None:
        """SIGHUP: reload the ranges in every ready worker; the others when they are ready."""
        for slot in self.slots:
            if slot.ready and slot.process is not None:
                slot.process.send_signal(signal.SIGHUP)
            else:
                slot.reload_pending = True

    def _begin_stop(self) -> None:
        """SIGTERM: not ready from now on; the workers drain and stop."""
        if self.stopping:
            return
        self.stopping = True
        running = [s for s in self.slots if s.running]
        log.info("shutting down %d workers", len(running))
        for slot in running:
            assert slot.process is not None
            slot.process.send_signal(signal.SIGTERM)
        self._stop.set()

    async def _wait_for_workers(self) -> None:
        limit = time.monotonic() + self.settings.drain_delay + self.settings.grace_period + 5.0
        while any(s.running for s in self.slots) and time.monotonic() < limit:
            await asyncio.sleep(0.05)

    def _kill_remaining(self) -> None:
        for slot in self.slots:
            if slot.running:
                assert slot.process is not None
                log.error("worker %s did not stop in time: killing it", slot.name)
                slot.process.kill()
            if slot.process is not None:
                try:
                    slot.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                self._release(slot)
