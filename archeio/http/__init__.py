"""The HTTP engines of the public port: each speaks the wire, the request flow decides.

- `httptools`: our lean HTTP/1.1 protocol (httptools_impl.py), the default:
  the fastest, measured in docs/performance.md.
- `aiohttp`: aiohttp's low-level `web.Server` (aiohttp_impl.py), the
  battle-tested stack.

Both take the same `RequestFlow` and report to the same kind of
`ConnectionTracker` (connections.py), so the limits, deadlines, metrics and
access logs are the same; docs/request-handling.md names where their
answers legitimately differ. An engine module is imported only when chosen:
the lean engine's start-up never imports aiohttp's server.
"""

from __future__ import annotations

import asyncio
from importlib import import_module
from typing import TYPE_CHECKING, Any, Protocol

from .connections import ConnectionTracker

if TYPE_CHECKING:
    from ..app import RequestFlow
    from ..config import Settings

ENGINES = {
    "httptools": ("archeio.http.httptools_impl", "HttpToolsEngine"),
    "aiohttp": ("archeio.http.aiohttp_impl", "AiohttpEngine"),
}
DEFAULT_ENGINE = "httptools"


class Engine(Protocol):
    """What the server needs of an HTTP engine."""

    name: str
    tracker: ConnectionTracker

    async def start(self, sock: Any) -> None:
        """Serve the public port on the listening socket."""

    def tick(self) -> None:
        """Once a second: refresh cached headers, enforce deadlines."""

    def stop_accepting(self) -> None:
        """Close the listening socket (connections stay)."""

    async def shutdown(self, grace: float) -> None:
        """Close idle connections now, the others once answered or after `grace` seconds."""


def make_engine(name: str, flow: RequestFlow, settings: Settings, loop: asyncio.AbstractEventLoop) -> Engine:
    module, cls = ENGINES[name]
    engine: Engine = getattr(import_module(module), cls)(flow, settings, loop)
    return engine
