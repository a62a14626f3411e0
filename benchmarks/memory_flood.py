#!/usr/bin/env python3
"""Memory under a flood of distinct digests: RSS growth against the configured cache bounds.

`benchmarks/memory_flood.py` starts one `archeio serve` (cache size
`--cache-size`, default the server's 200,000 entries per cache) and the
switchable mirror of fault_injection.py answering half the blobs 200 and
half 404, so both the hit cache and the miss cache fill. Then:

1. 1,000,000 blob requests (default `--digests`), every digest distinct
   and well formed, from an AWS eu-west-3 client: each costs one HEAD and
   one cache entry, so the caches fill and then must evict.
2. 40,000 requests with distinct 8,000-byte paths (the longest request
   target the default limit lets through): the router's table of
   remembered paths must not turn long paths into memory.

The server's resident memory (VmRSS of its process, from /proc) is read at
checkpoints; cache entry counts come from its admin port's /metrics. The
figure: RSS growth over each phase, per configured cache entry, and the
growth over the last 30% of the digests, long after the caches filled:
bounded means that is ~0 (at most 2% of the growth, or 4 MB).

`--kind manifests` floods manifests by digest instead, with the signature
fallback on (a signature upstream of its own; the regional upstream is the
same switchable stand-in, half the digests present): each costs a check of
the upstream and an entry keyed by repository, `<name>/manifests/<digest>`,
where a blob's entry is keyed by its digest alone. `--name` sets the
repository (up to 255 characters, the longest a name may be), so the cost
of the repository in the key can be read off.

Results: benchmarks/results/memory-flood.{json,md} (blobs in `pause`), else
memory-flood-<kind>-name<length>.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from fault_injection import mirror_heads, start_mirror
from harness import (
    EMBEDDED_RANGES,
    LOOPBACK,
    RESULTS,
    append_history,
    can_pin,
    free_port,
    machine,
    machine_line,
    start_archeio,
    write_mirrors_file,
)

CONNECTIONS = 128
BYTES_PER_ENTRY_FLOOR = 300
EU_WEST_3 = "35.180.1.1"
LONG_PATH_BYTES = 8000


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cache_entries(admin_port: int) -> dict[str, int]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{admin_port}/metrics", timeout=30) as response:
        text = response.read().decode()
    pattern = r'archeio_existence_cache_entries\{cache="(\w+)"\} (\S+)'
    return {m[1]: int(float(m[2])) for m in re.finditer(pattern, text)}


async def flood(port: int, targets: Any, count: int, on_progress: Any) -> dict[str, int]:
    """Send `count` GETs (paths from the `targets` iterator) over CONNECTIONS keep-alive connections."""
    statuses: dict[str, int] = {}
    sent = 0
    header = f"Host: x\r\nX-Forwarded-For: {EU_WEST_3}, 127.0.0.1\r\n\r\n".encode()

    async def connection() -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            while sent < count:
                sent += 1
                if sent % 50_000 == 0:
                    on_progress(sent)
                writer.write(b"GET " + next(targets).encode() + b" HTTP/1.1\r\n" + header)
                head = await reader.readuntil(b"\r\n\r\n")
                status = head[9:12].decode()
                statuses[status] = statuses.get(status, 0) + 1
                length = re.search(rb"Content-Length: (\d+)", head)
                if length and int(length[1]):
                    await reader.readexactly(int(length[1]))
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))
    return statuses


def distinct_digests(kind: str = "blobs", name: str = "pause") -> Any:
    n = 0
    while True:
        n += 1
        yield f"/v2/{name}/{kind}/sha256:{n:064x}"


def distinct_long_paths() -> Any:
    n = 0
    filler = "a" * (LONG_PATH_BYTES - 100)
    while True:
        n += 1
        yield f"/v2/{filler}{n:020d}/manifests/latest"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digests", type=int, default=1_000_000)
    parser.add_argument("--long-paths", type=int, default=40_000)
    parser.add_argument("--cache-size", type=int, default=200_000)
    parser.add_argument("--kind", choices=("blobs", "manifests"), default="blobs",
                        help="blobs checked in a mirror (default), or manifests by digest checked in the "
                             "regional upstream (the signature fallback on)")
    parser.add_argument("--name", default="pause", help="the repository of the requests (default pause)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory for the result files")
    args = parser.parse_args(argv)

    import uvloop

    server_cpus, generator_cpus = ("0", "1") if can_pin() else (None, None)
    info: dict[str, Any] = {"machine": machine(), "cache_size": args.cache_size, "digests": args.digests,
                            "kind": args.kind, "name_length": len(args.name)}
    stem = "memory-flood" if (args.kind, args.name) == ("blobs", "pause") else (
        f"memory-flood-{args.kind}-name{len(args.name)}")
    checkpoints: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="archeio-memory-") as tmp_name:
        tmp = Path(tmp_name)
        mirror_port, port, admin_port = free_port(), free_port(), free_port()
        base = f"http://{LOOPBACK}:{mirror_port}"
        env = {
            "UPSTREAM_REGISTRY_ENDPOINT": "http://127.0.0.2:5001",
            "DEFAULT_AWS_BASE_URL": f"{base}/cdn",
            "ARCHEIO_MIRRORS_FILE": str(write_mirrors_file(tmp / "mirrors.toml", {"AWS": {"eu-west-3": f"{base}/eu"}})),
            "ARCHEIO_CACHE_SIZE": str(args.cache_size),
            "ARCHEIO_CACHE_HIT_TTL": "86400", "ARCHEIO_CACHE_MISS_TTL": "86400",
            "ARCHEIO_ADMIN_PORT": str(admin_port), "ARCHEIO_ADMIN_HOST": LOOPBACK, **EMBEDDED_RANGES,
        }
        if args.kind == "manifests":
            # The fallback on: the stand-in is the regional upstream too; the signature upstream is never asked.
            env.update({"UPSTREAM_REGISTRY_ENDPOINT": base, "SIGNATURE_UPSTREAM_ENDPOINT": "http://127.0.0.3:5002"})
        with start_mirror(mirror_port, generator_cpus, tmp / "mirror.log", missing_share=0.5), \
                start_archeio(env, port, server_cpus, tmp / "archeio.log") as server:
            if generator_cpus:
                import os
                os.sched_setaffinity(0, {int(generator_cpus)})
            started = time.monotonic()

            def checkpoint(phase: str, requests: int) -> None:
                row = {"phase": phase, "requests": requests, "rss_mb": round(rss_bytes(server.pid) / 2**20, 1),
                       **cache_entries(admin_port), "seconds": round(time.monotonic() - started, 1)}
                checkpoints.append(row)
                print(json.dumps(row), flush=True)

            checkpoint("start", 0)
            digests = distinct_digests(args.kind, args.name)
            statuses = uvloop.run(flood(port, digests, args.digests, lambda n: checkpoint("digests", n)))
            checkpoint("digests done", args.digests)
            info["digest_statuses"] = statuses
            info["heads_per_1000"] = round(mirror_heads(mirror_port) * 1000 / args.digests, 1)
            long_statuses = uvloop.run(flood(port, distinct_long_paths(), args.long_paths,
                                             lambda n: checkpoint("long paths", args.digests + n)))
            checkpoint("long paths done", args.digests + args.long_paths)
            info["long_path_statuses"] = long_statuses
    report, ok, figures = summarize(info, checkpoints, args.cache_size)
    print()
    print(report)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"{stem}.json").write_text(json.dumps({**info, **figures, "checkpoints": checkpoints},
                                                           indent=2))
    (args.results / f"{stem}.md").write_text(report)
    append_history(args.results / f"{stem}-history.csv", {
        "date": info["machine"]["date"], "code": info["machine"]["archeio_commit"],
        "cpu_model": info["machine"]["cpu_model"], "cache_size": args.cache_size, "digests": args.digests,
        **figures})
    return 0 if ok else 1


def _filled(checkpoints: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The first checkpoint by which both caches have evicted (their count went down once).

    The caches forget a whole generation at a time (archeio/existence.py),
    so a full cache holds between half and all of its configured entries;
    the sign that it is full is that its count has gone down.
    """
    evicted = []
    for cache in ("hits", "misses"):
        found = next((cur for prev, cur in zip(checkpoints, checkpoints[1:], strict=False)
                      if cur["phase"] == "digests" and cur.get(cache, 0) < prev.get(cache, 0)), None)
        if found is None:
            return None
        evicted.append(found)
    return max(evicted, key=lambda c: c["requests"])


def _what(info: dict[str, Any]) -> str:
    name = f"a repository name of {info.get('name_length', 5)} characters"
    if info.get("kind") == "manifests":
        return f"manifests by digest checked in the regional upstream, {name} in each key"
    return f"blobs checked in the mirror, keyed by digest alone, {name}"


def summarize(info: dict[str, Any], checkpoints: list[dict[str, Any]],
              cache_size: int) -> tuple[str, bool, dict[str, Any]]:
    start = checkpoints[0]
    full = _filled(checkpoints)
    digests_done = next(c for c in checkpoints if c["phase"] == "digests done")
    end = checkpoints[-1]
    growth = digests_done["rss_mb"] - start["rss_mb"]
    lines = [
        "# Memory under a flood of distinct digests", "",
        f"Machine: {machine_line(info['machine'])}.", "",
        f"{info['digests']:,} distinct well-formed digests ({_what(info)}; half present, half not), then "
        f"{end['requests'] - digests_done['requests']:,} distinct {LONG_PATH_BYTES:,}-byte paths; "
        f"cache size {cache_size:,} entries per cache (hits, misses), TTLs one day.", "",
        "| phase | requests | RSS MB | hit entries | miss entries | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {c['phase']} | {c['requests']:,} | {c['rss_mb']} | {c.get('hits', '')} | {c.get('misses', '')} "
              f"| {c['seconds']} |" for c in checkpoints]
    ok = True
    figures: dict[str, Any] = {"bytes_per_configured_entry": None, "floor_bytes": BYTES_PER_ENTRY_FLOOR}
    lines.append("")
    if full is None:
        lines.append("The caches never evicted: raise --digests or lower --cache-size.")
        ok = False
    else:
        per_entry = (full["rss_mb"] - start["rss_mb"]) * 2**20 / (full["hits"] + full["misses"])
        after_full = digests_done["rss_mb"] - full["rss_mb"]
        # The plateau test: growth over the last 30% of the digests, long after the caches filled.
        late = next(c for c in checkpoints if c["requests"] >= 0.7 * info["digests"])
        late_growth = digests_done["rss_mb"] - late["rss_mb"]
        long_growth = end["rss_mb"] - digests_done["rss_mb"]
        per_configured = growth * 2**20 / (2 * cache_size)
        lines += [
            f"- RSS growth over {info['digests']:,} distinct digests: **{growth:.1f} MB**, that is "
            f"{per_configured:.0f} bytes per configured cache entry (2 x {cache_size:,}); "
            f"{per_entry:.0f} bytes an entry while the caches filled.",
            f"- Growth after both caches first evicted ({full['requests']:,} requests on): {after_full:.1f} MB; "
            f"over the last 30% of the digests: **{late_growth:.1f} MB**.",
            f"- Growth over {end['requests'] - digests_done['requests']:,} distinct long paths: "
            f"**{long_growth:.1f} MB**.",
            f"- HEADs per 1,000 flood requests (all digests distinct): {info['heads_per_1000']}.",
            f"- Statuses: digests {info['digest_statuses']}, long paths {info['long_path_statuses']}.",
        ]
        ok = late_growth <= max(4.0, 0.02 * growth) and long_growth <= 16
        figures.update({"bytes_per_configured_entry": round(per_configured),
                        "bytes_per_entry_filling": round(per_entry), "growth_mb": round(growth, 1),
                        "late_growth_mb": round(late_growth, 1), "long_path_growth_mb": round(long_growth, 1)})
        if info.get("kind", "blobs") == "blobs":  # the floor is the blobs' (issue 13)
            lines.append(f"- Floor (issue 13): <= {BYTES_PER_ENTRY_FLOOR} bytes of RSS per configured entry: "
                         f"{'met' if per_configured <= BYTES_PER_ENTRY_FLOOR else 'NOT met'}.")
    lines += ["", "Verdict: " + ("bounded." if ok else "NOT BOUNDED as configured."), ""]
    return "\n".join(lines), ok, figures


if __name__ == "__main__":
    sys.exit(main())
