"""A stand-in bucket for tests: a real local HTTP server that counts HEADs.

It serves `HEAD /<prefix>/containers/images/<digest>` with 200 for the
digests it holds and 404 otherwise; `delay` slows every answer and
`status` forces one (500, say), so tests can watch caching, coalescing,
deadlines and failures from the bucket's side.

At its root it also plays a registry for the signature fallback's check:
`HEAD /v2/<name>/manifests|blobs/<digest>` is 200 when it holds
`<name>/<digest>` under the prefix `registry` (`add_to_registry`); such
HEADs are counted under `registry/<name>/<digest>`, and the `Accept` of
each is kept in `accepts`.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from aiohttp import web


class StandInBucket:
    def __init__(self) -> None:
        self.blobs: set[str] = set()  # "<prefix>/<digest>"
        self.heads: Counter[str] = Counter()
        self.accepts: dict[str, str | None] = {}
        self.delay = 0.0
        self.status: int | None = None
        self.url = ""
        self._runner: web.AppRunner | None = None

    def add(self, prefix: str, digest: str) -> None:
        self.blobs.add(f"{prefix}/{digest}")

    def add_to_registry(self, name: str, digest: str) -> None:
        """Hold `digest` in repository `name` of the registry at the root (`url`)."""
        self.blobs.add(f"registry/{name}/{digest}")

    def base(self, prefix: str) -> str:
        return f"{self.url}/{prefix}"

    async def _handle(self, request: web.Request) -> web.Response:
        if request.path.startswith("/v2/"):
            name, _kind, digest = request.path.removeprefix("/v2/").rsplit("/", 2)
            key = f"registry/{name}/{digest}"
            self.accepts[key] = request.headers.get("Accept")
        else:
            prefix, _, digest = request.path.lstrip("/").partition("/containers/images/")
            key = f"{prefix}/{digest}"
        self.heads[key] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status is not None:
            return web.Response(status=self.status)
        return web.Response(status=200 if key in self.blobs else 404)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
