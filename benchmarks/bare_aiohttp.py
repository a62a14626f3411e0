#!/usr/bin/env python3
"""The ceiling of any engine built on aiohttp: its bare `web.Server` answering one fixed 307.

`benchmarks/throughput --bare-aiohttp` measures this beside the aiohttp
engine (issue 20: that engine's goal is a share of this server's
requests/s). It is aiohttp's low-level server, as the engine uses it, on
uvloop, with nothing of ours: no routing, no connection tracker, no access
log, no metrics. Every request, whatever its method or path, gets a 307 to
`--location`. It binds loopback only.
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from aiohttp import web


def make_server(location: str) -> web.Server:
    """A `web.Server` whose every answer is the same 307, built once; no access log."""
    headers = {"Location": location}

    async def redirect(request: web.BaseRequest) -> web.StreamResponse:
        # A response object cannot be sent twice: one per request, as any
        # aiohttp handler must.
        return web.Response(status=307, headers=headers)

    return web.Server(redirect, access_log=None)


async def serve(port: int, location: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(make_server(location), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--location", required=True, help="the Location of every 307")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.location))


if __name__ == "__main__":
    main()
