"""The server process: sockets, the once-a-second housekeeping, signals, shutdown.

Start-up loads the range index, opens the existence cache's client session,
binds the public port and logs the configuration and the range data's date
once. SIGHUP (and the `ranges_refresh` timer) reloads the range files
(reload.py). SIGTERM or SIGINT starts a graceful stop: /readyz fails at
once, requests are still served for `drain_delay` seconds (load balancers
need that long to stop sending), then the port stops accepting, idle
connections close, busy ones finish their answer within `grace` seconds,
the client session closes, and `run` returns.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import uvloop

from iprange import describe, load_index

from .admin import start_admin
from .app import Frontend
from .config import Settings
from .existence import BlobExistenceCache
from .metrics import ServerSource, WorkerStats, snapshot, write_snapshot
from .protocol import Connections
from .reload import RangeReloader

log = logging.getLogger("archeio")


def make_cache(
    settings: Settings, on_check: Callable[[str, str, float], None] | None = None
) -> BlobExistenceCache:
    return BlobExistenceCache(
        hit_ttl=settings.cache_hit_ttl,
        miss_ttl=settings.cache_miss_ttl,
        error_ttl=settings.cache_error_ttl,
        size=settings.cache_size,
        head_timeout=settings.head_timeout,
        head_concurrency=settings.head_concurrency,
        breaker_failures=settings.breaker_failures,
        breaker_cooldown=settings.breaker_cooldown,
        on_check=on_check,
    )


def bind(settings: Settings, reuse_port: bool = False) -> socket.socket:
    """The public listening socket (IPv4, or dual-stack for an IPv6 host)."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind((settings.host, settings.port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


class Server:
    """One serving process: the public port and its housekeeping.

    `admin` serves the admin port from this process (a single-process
    server); a worker of several instead writes its metrics snapshot to
    `snapshot_path` every second for the supervisor (workers.py).
    """

    def __init__(
        self, settings: Settings, grace: float | None = None, *, admin: bool = False,
        worker: str = "0", snapshot_path: Path | None = None,
    ) -> None:
        self.settings = settings
        self.grace = settings.grace_period if grace is None else grace
        self.admin = admin
        self.worker = worker
        self.snapshot_path = snapshot_path
        self.stopping = asyncio.Event()
        self.draining = False
        self.stats = WorkerStats()
        self.frontend: Frontend | None = None
        self.connections: Connections | None = None
        self.reloader: RangeReloader | None = None
        self.port: int | None = None

    @property
    def ready(self) -> bool:
        return self.port is not None and not self.draining

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "shutting down"
        if self.port is None:
            return False, "starting"
        return True, "ready"

    async def run(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        settings = self.settings
        index = load_index(settings.ranges_dir)
        # Bind before opening the client session: a port in use then fails
        # start-up without leaving a session unclosed.
        sock = sock or bind(settings)
        cache = make_cache(settings, self.stats.on_check)
        await cache.start()
        self.frontend = frontend = Frontend(settings, index, cache)
        self.connections = connections = Connections(frontend, loop)
        self.reloader = reloader = RangeReloader(
            frontend, settings.ranges_dir, settings.ranges_max_loss, self.stats.reloads
        )
        server = await loop.create_server(connections.protocol, sock=sock)
        self.port = sock.getsockname()[1]
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        log.info(
            "serving on %s:%s", settings.host, self.port,
            extra={"fields": {
                "ranges": describe(index),
                "ranges_source": str(settings.ranges_dir or "embedded"),
                "config": settings.summary(),
                "startup_seconds": round(time.monotonic() - started, 3),
            }},
        )
        loop.add_signal_handler(signal.SIGHUP, reloader.request, "SIGHUP")
        background = [loop.create_task(self._housekeeping())]
        if settings.ranges_refresh:
            background.append(loop.create_task(reloader.refresh_every(settings.ranges_refresh)))
        admin = None
        try:
            if self.admin:
                admin = await start_admin(settings.admin_host, settings.admin_port, ServerSource(self))
            self._write_snapshot()
            await self.stopping.wait()
            self.draining = True
            self._write_snapshot()
            log.info("draining: /readyz fails; serving %s s before closing the port", settings.drain_delay)
            await asyncio.sleep(settings.drain_delay)
        finally:
            self.draining = True
            log.info("shutting down")
            server.close()
            connections.close_idle()
            deadline = loop.time() + self.grace
            while connections.open and loop.time() < deadline:
                await asyncio.sleep(0.05)
            for conn in list(connections.open):
                conn.close(reason="grace period over")
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await reloader.close()
            await cache.close()
            if admin is not None:
                await admin.cleanup()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self._write_snapshot()
            log.info("stopped")

    def _write_snapshot(self) -> None:
        if self.snapshot_path is not None:
            write_snapshot(self.snapshot_path, snapshot(self, self.worker))

    async def _housekeeping(self) -> None:
        assert self.frontend is not None and self.connections is not None
        while True:
            await asyncio.sleep(1.0)
            self.frontend.tick()
            self.connections.sweep()
            self._write_snapshot()


def run(settings: Settings) -> None:
    """Serve in this one process, admin port included, until SIGTERM/SIGINT, on uvloop."""
    uvloop.run(Server(settings, admin=True).run())
