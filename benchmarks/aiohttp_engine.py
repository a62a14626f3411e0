#!/usr/bin/env python3
"""The same redirect decisions served by aiohttp's low-level server, for comparison only.

archeio's public port is a lean httptools protocol rather than aiohttp's
web server. This script exists so that choice rests on numbers: it serves
the very same decision (archeio's Router, range index and existence cache,
read from the same settings) through `aiohttp.web.Server`, the cheapest
aiohttp layer (no application, router or middleware), on uvloop.
`benchmarks/throughput --engines` runs it beside `archeio serve`.

With `--fixed`, every request gets one constant 307 instead: aiohttp's own
ceiling for a redirect, whatever the logic costs.

It is a benchmark instrument, not a second server: it lives here, not in
the package, and skips what the comparison does not need (metrics, the
admin port, request limits).
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter

import uvloop
from aiohttp import web

from archeio.clientip import client_ip
from archeio.config import load_settings
from archeio.routing import BLOB, CLIENT_IP_INVALID, LocalAnswer, Route, Router
from archeio.server import make_cache
from iprange import InvalidAddress, load_index


def local_response(answer: LocalAnswer) -> web.Response:
    headers = {"Location": answer.location} if answer.location else {}
    if answer.status == 200:
        headers["Docker-Distribution-Api-Version"] = "registry/2.0"
    return web.Response(status=answer.status, body=answer.body, headers=headers,
                        content_type=answer.content_type)


async def serve(port: int, fixed: str | None) -> None:
    settings = load_settings()
    index = load_index(settings.ranges_dir)
    router = Router(settings)
    cache = make_cache(settings)
    await cache.start()
    hops = settings.trusted_hops
    # The same per-request bookkeeping the real frontend does, to compare like with like.
    requests: Counter[tuple[str, int]] = Counter()

    async def fixed_redirect(request: web.BaseRequest) -> web.Response:
        return web.Response(status=307, headers={"Location": fixed or ""})

    async def decide(request: web.BaseRequest) -> web.Response:
        path, _, query = request.raw_path.partition("?")
        route = router.classify(request.method, path)
        if type(route) is LocalAnswer:
            requests[("other", route.status)] += 1
            return local_response(route)
        assert isinstance(route, Route)
        if route.kind != BLOB or route.digest is None:
            decision = router.upstream_location(route, query)
        else:
            address = client_ip(request.headers.get("X-Forwarded-For"), request.remote, hops)
            try:
                placement = index.lookup(address) if address else None
            except InvalidAddress:
                address = None
            if address is None:
                requests[(BLOB, 400)] += 1
                return local_response(CLIENT_IP_INVALID)
            mirror = router.mirror_for(placement)
            found = False if mirror is None else cache.cached(mirror, route.digest)
            if found is None:
                assert mirror is not None
                found = await cache.check(mirror, route.digest)
            decision = router.decide(route, query, placement, found)
        requests[(route.kind, 307)] += 1
        return web.Response(status=307, headers={"Location": decision.location})

    server = web.Server(fixed_redirect if fixed else decide, access_log=None)
    loop = asyncio.get_running_loop()
    await loop.create_server(server, "127.0.0.1", port, backlog=4096)
    try:
        await asyncio.Event().wait()
    finally:
        await cache.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fixed", metavar="URL", help="answer every request with a 307 to URL")
    args = parser.parse_args()
    try:
        uvloop.run(serve(args.port, args.fixed))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
