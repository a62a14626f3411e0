#!/usr/bin/env python3
"""A local stand-in for the S3 blob mirrors: answers HEAD/GET by digest, on loopback.

The server checks `<mirror>/containers/images/<digest>` with a HEAD before
redirecting a blob there. This bucket answers those HEADs for any mirror
prefix (`/<anything>/containers/images/<digest>`), so one process stands
in for every regional bucket of a benchmark's mirrors file:

- `--all-present`: 200 for every well-formed digest (the throughput
  benchmark's warm cache);
- otherwise 200 for the catalog's blobs that `pull_catalog.in_mirrors`
  says the mirrors hold, 404 for the missing share and anything unknown.

It counts the HEADs it answered (GET `/` returns the counts as JSON), so a
run can show the existence checks were real network calls.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter

from aiohttp import web
from pull_catalog import all_blobs, build_catalog, in_mirrors

BLOB_SIZE = "4096"
_BLOB_PATH = re.compile(r"/(?:.*/)?containers/images/(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})")


def make_app(present: set[str] | None) -> web.Application:
    """`present`: the digests held, or None for "every digest"."""
    counts: Counter[str] = Counter()

    async def blob(request: web.Request) -> web.Response:
        match = _BLOB_PATH.fullmatch(request.path)
        held = match is not None and (present is None or match[1] in present)
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
    parser.add_argument("--all-present", action="store_true", help="hold every digest")
    parser.add_argument("--seed", type=int, default=1, help="catalog seed (as the locustfile's)")
    parser.add_argument("--images", type=int, default=60, help="catalog size (as the locustfile's)")
    parser.add_argument("--missing-share", type=float, default=0.05,
                        help="share of catalog blobs the mirrors lack (as the locustfile's)")
    args = parser.parse_args()
    present = None
    if not args.all_present:
        blobs = all_blobs(build_catalog(args.seed, args.images))
        present = {d for d in blobs if in_mirrors(d, args.missing_share)}
    # Loopback only: the benchmarks never send traffic anywhere else.
    web.run_app(make_app(present), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
