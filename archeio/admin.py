"""The admin port: /metrics, /healthz, /readyz, never on the public port.

A separate port, because the public port answers anyone on the internet
and these answer the operator: Prometheus scrapes it and the orchestrator
probes it, and neither should be reachable through the load balancer.

It lives in the serving process when there is one, and in the supervisor
when there are several workers (workers.py). A scrape or a probe every few
seconds needs no framework: this is a small HTTP/1.1 server on asyncio's
streams, one request per connection, so the supervisor imports neither
aiohttp nor uvloop and stays small.

- /healthz: 200 while the process's event loop runs (liveness).
- /readyz: 200 once the range data is loaded and the port accepts
  requests; 503 from the moment SIGTERM arrives (readiness).
- /metrics: Prometheus text format (metrics.py).
"""

from __future__ import annotations

import asyncio
import logging

from .http.answers import reason
from .metrics import MetricsSource, render

log = logging.getLogger("archeio.admin")

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A probe's request is a few hundred bytes; a client gets this long to send it.
_REQUEST_LIMIT = 8192
_REQUEST_TIMEOUT = 10.0


class AdminServer:
    """Serves one `MetricsSource` on host:port."""

    def __init__(self, source: MetricsSource) -> None:
        self.source = source
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, host, port, reuse_address=True, limit=_REQUEST_LIMIT
            )
        except OSError as exc:
            raise OSError(exc.errno, f"admin port {host}:{port}: {exc.strerror}") from None
        log.info("admin port on %s:%s (/metrics, /healthz, /readyz)", host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request."""
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        path = path.split("?", 1)[0]
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ready, reason = self.source.readiness()
            return (200 if ready else 503), "text/plain", reason.encode() + b"\n"
        if path == "/metrics":
            return 200, METRICS_CONTENT_TYPE, render(self.source)
        return 404, "text/plain", b"not found\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_TIMEOUT)
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                status, content_type, body = 400, "text/plain", b"bad request\n"
                method = "GET"
            else:
                method = parts[0].decode("latin-1")
                try:
                    status, content_type, body = self.answer(method, parts[1].decode("latin-1"))
                except Exception:  # a bug in a metrics part must not kill the admin port
                    log.exception("admin request failed")
                    status, content_type, body = 500, "text/plain", b"internal error\n"
            writer.write(
                f"HTTP/1.1 {status} {reason(status)}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (b"" if method == "HEAD" else body)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


async def start_admin(host: str, port: int, source: MetricsSource) -> AdminServer | None:
    """Serve the admin port on host:port; None when the port is 0 (admin off)."""
    if port == 0:
        return None
    admin = AdminServer(source)
    await admin.start(host, port)
    return admin
