#!/usr/bin/env python3
"""A local stand-in for the S3 blob mirrors: answers HEAD/GET by digest, on loopback.

The server checks `<mirror>/containers/images/<digest>` with a HEAD before
redirecting a blob there. This bucket answers those HEADs for any mirror
prefix (`/<anything>/containers/images/<digest>`), so one process stands
in for every regional bucket of a benchmark's mirrors file:

- `--all-present`: 200 for every well-formed digest (the throughput
  benchmark's warm cache);
- otherwise 200 for the blobs `pull_catalog.in_mirrors` says the mirrors
  hold, 404 for the missing share (`--missing-share`). That rule is a hash
  of the digest, so it holds for the catalog's blobs and for any digest a
  replayed log asks for, and the load generators predict it without
  sharing anything with this process.

It counts the HEADs it answered (GET `/` returns the counts as JSON), so a
run can show the existence checks were real network calls.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter

from aiohttp import web
from pull_catalog import in_mirrors

BLOB_SIZE = "4096"
_BLOB_PATH = re.compile(r"/(?:.*/)?containers/images/(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})")


def make_app(missing_share: float | None) -> web.Application:
    """`missing_share`: of the digests, by `in_mirrors`; None: every digest is held."""
    counts: Counter[str] = Counter()

    async def blob(request: web.Request) -> web.Response:
        match = _BLOB_PATH.fullmatch(request.path)
        held = match is not None and (missing_share is None or in_mirrors(match[1], missing_share))
        counts["200" if held else "404"] += 1
        if request.method == "HEAD":
            # Like S3, say how long the object is: without a Content-Length
            # aiohttp's client cannot reuse the connection after a HEAD.
            return web.Response(status=200 if held else 404, headers={"Content-Length": BLOB_SIZE if held else "0"})
        return web.Response(status=200 if held else 404)

    async def stats(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps(counts), content_type="application/json")

    app = web.Application()
    app.router.add_get("/", stats)
    app.router.add_route("HEAD", "/{tail:.*}", blob)
    app.router.add_get("/{tail:.+}", blob)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default loopback; deploy/loadtest runs it as a cluster Service)")
    parser.add_argument("--all-present", action="store_true", help="hold every digest")
    parser.add_argument("--missing-share", type=float, default=0.05,
                        help="share of blobs the mirrors lack (as the load generator's BENCH_MISSING_SHARE)")
    args = parser.parse_args()
    # Loopback by default: the local benchmarks never send traffic anywhere else.
    web.run_app(make_app(None if args.all_present else args.missing_share), host=args.host, port=args.port,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
