"""The admin port: /metrics, /healthz, /readyz, never on the public port.

A separate port, because the public port answers anyone on the internet
and these answer the operator: Prometheus scrapes it and the orchestrator
probes it, and neither should be reachable through the load balancer.
It is a plain aiohttp application: a scrape or a probe every few seconds
needs none of the public port's lean protocol.

- /healthz: 200 while the process's event loop runs (liveness).
- /readyz: 200 once the range data is loaded and the port accepts
  requests; 503 from the moment SIGTERM arrives (readiness).
- /metrics: Prometheus text format, from `metrics.ArcheioCollector`.
"""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .metrics import ArcheioCollector, MetricsSource

log = logging.getLogger("archeio.admin")

SOURCE = web.AppKey("source", MetricsSource)
REGISTRY = web.AppKey("registry", CollectorRegistry)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    ready, reason = request.app[SOURCE].readiness()
    return web.Response(status=200 if ready else 503, text=reason + "\n")


def make_admin_app(source: MetricsSource) -> web.Application:
    app = web.Application()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ArcheioCollector(source))
    app[SOURCE] = source
    app[REGISTRY] = registry
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def start_admin(host: str, port: int, source: MetricsSource) -> web.AppRunner | None:
    """Serve the admin app on host:port; None when the port is 0 (admin off)."""
    if port == 0:
        return None
    # No access log: probes every few seconds would drown the real logs.
    runner = web.AppRunner(make_admin_app(source), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(exc.errno, f"admin port {host}:{port}: {exc.strerror}") from None
    log.info("admin port on %s:%s (/metrics, /healthz, /readyz)", host, port)
    return runner
