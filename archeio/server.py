"""The server process: sockets, the once-a-second housekeeping, signals, shutdown.

Start-up loads the range index, opens the existence cache's client session,
binds the public port and logs the configuration and the range data's date
once. SIGTERM or SIGINT starts a graceful stop: stop accepting, close idle
connections, let busy ones finish their answer within `grace` seconds,
close the client session, return.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time

import uvloop

from iprange import describe, load_index

from .app import Frontend
from .config import Settings
from .existence import BlobExistenceCache
from .protocol import Connections

log = logging.getLogger("archeio")


def make_cache(settings: Settings) -> BlobExistenceCache:
    return BlobExistenceCache(
        hit_ttl=settings.cache_hit_ttl,
        miss_ttl=settings.cache_miss_ttl,
        error_ttl=settings.cache_error_ttl,
        size=settings.cache_size,
        head_timeout=settings.head_timeout,
        head_concurrency=settings.head_concurrency,
        breaker_failures=settings.breaker_failures,
        breaker_cooldown=settings.breaker_cooldown,
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
    """One serving process: the public port and its housekeeping."""

    def __init__(self, settings: Settings, grace: float = 5.0) -> None:
        self.settings = settings
        self.grace = grace
        self.stopping = asyncio.Event()
        self.frontend: Frontend | None = None
        self.connections: Connections | None = None
        self.port: int | None = None

    async def run(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        settings = self.settings
        index = load_index(settings.ranges_dir)
        cache = make_cache(settings)
        await cache.start()
        self.frontend = frontend = Frontend(settings, index, cache)
        self.connections = connections = Connections(frontend, loop)
        sock = sock or bind(settings)
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
        housekeeping = loop.create_task(self._housekeeping())
        try:
            await self.stopping.wait()
        finally:
            log.info("shutting down")
            server.close()
            connections.close_idle()
            deadline = loop.time() + self.grace
            while connections.open and loop.time() < deadline:
                await asyncio.sleep(0.05)
            for conn in list(connections.open):
                conn.close(reason="grace period over")
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping
            await cache.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            log.info("stopped")

    async def _housekeeping(self) -> None:
        assert self.frontend is not None and self.connections is not None
        while True:
            await asyncio.sleep(1.0)
            self.frontend.tick()
            self.connections.sweep()


def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT, on uvloop."""
    uvloop.run(Server(settings).run())
