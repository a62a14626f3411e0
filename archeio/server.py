"""One serving process: the public port, its housekeeping, signals and shutdown.

Start-up loads the range index, binds the public port, starts the chosen
HTTP engine (archeio/http/) on it and logs the configuration and the range
data's date once. SIGHUP (and the `ranges_refresh` timer) reloads the range
files (reload.py). SIGTERM or SIGINT starts a graceful stop: /readyz fails
at once, requests are still served for `drain_delay` seconds (load
balancers need that long to stop sending), then the port stops accepting,
idle connections close, busy ones get `grace` seconds for their answers,
the client session closes, and `run` returns.

This module is where the parts meet: it hands each component's counters to
the process's `Exporter` (metrics.py), so that no component needs to know
of another.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable

from iprange import RangeFileError, describe, load_index

from . import signals
from .admin import start_admin
from .app import RequestFlow, make_flow
from .config import Settings
from .existence import BlobExistenceCache, client_imported, finish_warming, warm_client
from .http import Engine, make_engine
from .loopstats import LoopStats, freeze_after_start
from .metrics import CheckLatency, Exporter, Snapshot, build_info, published_timestamp
from .providers import expected_providers, missing_providers, required_providers, with_prefixes
from .reload import RangeReloader
from .sockets import bind

log = logging.getLogger("archeio")

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Server:
    """One serving process: the public port and its housekeeping.

    `admin` serves the admin port from this process (a single-process
    server); a worker of several instead hands its snapshot to `report`
    every second, and the supervisor serves the admin port (workers.py).

    `manage_gc` is for a process that only serves (the command line's and a
    worker's, not a test's): the collector stays off while it starts, and
    what start-up made is frozen out of its reach once it serves
    (loopstats.py).
    """

    def __init__(
        self, settings: Settings, grace: float | None = None, *, admin: bool = False,
        worker: str = "0", report: Callable[[Snapshot], None] | None = None, manage_gc: bool = False,
    ) -> None:
        self.settings = settings
        self.manage_gc = manage_gc
        self.grace = settings.grace_period if grace is None else grace
        self.admin = admin
        self.report = report
        self.stopping = asyncio.Event()
        self.draining = False
        self.exporter = Exporter(worker)
        self.exporter.provide("ready", lambda: self.ready)
        self.flow: RequestFlow | None = None
        self.engine: Engine | None = None
        self.reloader: RangeReloader | None = None
        self.port: int | None = None

    @property
    def ready(self) -> bool:
        return self.port is not None and not self.draining

    # -- the admin port's view of this process (metrics.MetricsSource) ------------

    def snapshots(self) -> list[Snapshot]:
        return [self.exporter.snapshot()]

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "shutting down"
        if self.port is None:
            return False, "starting"
        return True, "ready"

    def worker_counts(self) -> dict[str, int]:
        return {"configured": 1, "running": 1, "ready": int(self.ready), "restarts": 0}

    # -- lifecycle ------------------------------------------------------------------

    async def run(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        if self.manage_gc:
            gc.disable()  # start-up makes many objects and no garbage: no collection walks them meanwhile
        settings = self.settings
        index = load_index(settings.ranges_dir)
        problem = missing_providers(settings, with_prefixes(index.prefix_counts))
        if problem:
            raise RangeFileError(problem)
        # Bind before anything that must be closed again: a port in use then
        # fails start-up with nothing left open.
        sock = sock or bind(settings)
        latency = CheckLatency()
        cache = BlobExistenceCache.from_settings(settings, latency.on_check)
        await cache.start()
        self.flow = flow = make_flow(settings, index, cache)
        self.engine = engine = make_engine(settings.http, flow, settings, loop)
        reloads: Counter[tuple[str, str]] = Counter()
        self.reloader = reloader = RangeReloader(
            flow, settings.ranges_dir, settings.ranges_max_loss, reloads, required_providers(settings)
        )
        self._export(flow, engine, cache, latency, reloader, reloads)
        # The answers' latencies are folded into their histogram at each of its
        # ticks (every 50 ms): a fold sorts what was appended since the last,
        # about 0.15 us an answer, with the loop held meanwhile: a quarter of a
        # millisecond at 35,000 answers a second, where a fold once a second
        # held the loop 5 ms (and 12-30 ms at 70,000).
        stats = LoopStats(loop, also=flow.latency.fold)
        self.exporter.provide("loop", stats.snapshot)
        await engine.start(sock)
        self.port = sock.getsockname()[1]
        # What each signal did before: restored at the end, so a signal held
        # by archeio.signals stays harmless while the process exits.
        before = {sig: signal.getsignal(sig) for sig in (*_STOP_SIGNALS, signal.SIGHUP)}
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, reloader.request, "SIGHUP")
        log.info(
            "serving on %s:%s", settings.host, self.port,
            extra={"fields": {
                "engine": engine.name,
                "ranges": describe(index),
                "ranges_source": str(settings.ranges_dir or "embedded"),
                "config": settings.summary(),
                "startup_seconds": round(time.monotonic() - started, 3),
            }},
        )
        if self.manage_gc:
            freeze_after_start()
        stats.start()
        # Signals that came in while starting are acted on now.
        if signals.take(signal.SIGTERM):
            self.stopping.set()
        if signals.take(signal.SIGHUP):
            reloader.request("SIGHUP held during start-up")
        background = [loop.create_task(self._housekeeping(engine))]
        if settings.ranges_refresh:
            background.append(loop.create_task(reloader.refresh_every(settings.ranges_refresh)))
        admin = None
        try:
            if self.admin:
                admin = await start_admin(settings.admin_host, settings.admin_port, self)
            # Serving already: the HEAD client's import goes on beside the requests.
            warm_client()
            self._report()
            await self.stopping.wait()
            self.draining = True
            self._report()
            log.info("draining: /readyz fails; serving %s s before closing the port", settings.drain_delay)
            await asyncio.sleep(settings.drain_delay)
        finally:
            self.draining = True
            log.info("shutting down")
            engine.stop_accepting()
            await engine.shutdown(self.grace)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            stats.stop()
            await reloader.close()
            await cache.close()
            if admin is not None:
                await admin.close()
            finish_warming()
            for sig, handler in before.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)
            self._report()
            log.info("stopped")

    def _export(
        self, flow: RequestFlow, engine: Engine, cache: BlobExistenceCache, latency: CheckLatency,
        reloader: RangeReloader, reloads: Counter[tuple[str, str]],
    ) -> None:
        """Hand every component's numbers to the exporter, as plain data."""
        provide = self.exporter.provide
        provide("build", lambda: build_info(engine.name))
        provide("requests", flow.request_rows)
        provide("latency", flow.latency.snapshot)
        provide("blob_decisions", flow.blob_rows)
        provide("connections", engine.tracker.gauges)
        provide("connections_closed", lambda: dict(engine.tracker.closed))
        provide("checks", lambda: [[m, o, n] for (m, o), n in cache.outcomes.items()])
        provide("check_latency", latency.snapshot)
        provide("cache", cache.size_rows)
        provide("breakers", lambda: {mirror: b.state for mirror, b in cache.breakers.items()})
        provide("reloads", lambda: [[c, o, n] for (c, o), n in reloads.items()])
        limiter = flow.limiter
        if limiter is not None:
            provide("rate_clients", limiter.__len__)
            provide("rate_forgotten", lambda: limiter.forgotten)
        # Every expected provider is there, with 0 prefixes when absent: an alert can fire on it.
        absent = {cloud: {"prefixes": 0} for cloud in expected_providers(self.settings)}
        provide("ranges", lambda: absent | {
            cloud: {
                "prefixes": flow.index.prefix_counts.get(cloud, 0),
                "serial": provider.serial,
                "published": published_timestamp(provider.serial),
                "loaded": reloader.loaded_at.get(cloud, flow.index_loaded_at),
            }
            for cloud, provider in flow.index.providers.items()
        })

    def _report(self) -> None:
        if self.report is not None:
            self.report(self.exporter.snapshot())

    async def _housekeeping(self, engine: Engine) -> None:
        frozen_again = not self.manage_gc
        while True:
            await asyncio.sleep(1.0)
            engine.tick()
            if not frozen_again and client_imported():
                # The HEAD client's modules, imported beside the first requests: frozen too.
                gc.freeze()
                frozen_again = True
            self._report()


def run(settings: Settings) -> None:
    """Serve in this one process, admin port included, until SIGTERM/SIGINT, on uvloop."""
    import uvloop

    uvloop.run(Server(settings, admin=True, manage_gc=True).run())
