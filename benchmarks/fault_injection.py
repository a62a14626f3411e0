#!/usr/bin/env python3
"""Fault injection: the blob mirrors hang mid-run under a steady realistic load.

`benchmarks/fault_injection.py` starts one `archeio serve` (defaults for the
HEAD deadline, 1 s, and the breaker, 5 failures / 10 s cool-down), a
mirror whose behaviour can be switched over HTTP, and drives a fixed
offered rate (default 1,000 req/s) of registry requests from an aiohttp
client loop on uvloop. Mid-run every mirror starts to hang (accept the
HEAD, never answer); later it recovers. It reports p50/p99/max blob
latency before, during and after the fault, split at the moments the
server's own log says the breakers opened and closed again.

Why not the Locust file: it checks that each blob lands in the mirror
expected in a healthy world, so the upstream redirects that are correct
during the fault would count as failures; this loop instead accepts the
mirror or the upstream Location for a blob and rejects anything else. The
traffic is shaped the same way: images from `pull_catalog` with Zipf
popularity, manifests and blobs, clients in two AWS regions, unknown
(default mirror) and Google Cloud (upstream, no check), plus a share of
never-seen digests so existence checks keep happening after warm-up.

Latency is measured from each request's *scheduled* send time (open loop),
so a stalled generator shows up as latency instead of hiding it.

Floor (issue 7): with the breakers open, blob p99 under 10 ms at
1,000 req/s. Upstream's server in the same situation waits up to 5 s (its
HEAD timeout) on every uncached blob for as long as the mirror hangs.

Also `fault_injection.py mirror --port P`: only the switchable mirror
(used by memory_flood.py too). Results: benchmarks/results/fault-injection.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    EMBEDDED_RANGES,
    LOOPBACK,
    RESULTS,
    Process,
    can_pin,
    free_port,
    machine,
    machine_line,
    pinned,
    start_archeio,
    start_serving,
    write_mirrors_file,
)
from pull_catalog import build_catalog, digest_of, in_mirrors, zipf_weights

P99_FLOOR_MS = 10.0
MISSING_SHARE = 0.05
FRESH_SHARE = 0.05  # of blob requests: digests never asked before (new releases)
MANIFEST_SHARE = 0.25
UPSTREAM = "http://127.0.0.2:5001"  # never contacted: only redirected to
REGISTRY_PATH = "k8s-artifacts-prod/images"
EU_WEST_3 = "35.180.1.1"
GOOGLE_CLOUD = "35.220.26.1"
NOBODY = "192.168.0.1"


# -- the switchable mirror ----------------------------------------------------------


def run_mirror(port: int, missing_share: float = MISSING_SHARE) -> None:
    """A blob mirror on loopback: 200 for blobs `in_mirrors` holds, else 404; hangs on command.

    `GET /_fault` shows the mode and counts; `POST /_fault?mode=hang|ok`
    switches it. In `hang` mode a HEAD is read and never answered.
    """
    import uvloop
    from aiohttp import web

    state: dict[str, Any] = {"mode": "ok", "heads": 0}
    forever = asyncio.Event()

    async def control(request: web.Request) -> web.Response:
        if request.method == "POST":
            state["mode"] = request.query.get("mode", "ok")
        return web.json_response(state)

    async def blob(request: web.Request) -> web.StreamResponse:
        state["heads"] += 1
        if state["mode"] == "hang":
            await forever.wait()
        held = in_mirrors(request.path.rsplit("/", 1)[-1], missing_share)
        # A Content-Length on the HEAD answer, as S3 sends: aiohttp's client
        # reuses the connection only then.
        return web.Response(status=200 if held else 404, headers={"Content-Length": "4096" if held else "0"})

    app = web.Application()
    app.router.add_route("*", "/_fault", control)
    app.router.add_route("HEAD", "/{tail:.*}", blob)
    uvloop.install()
    web.run_app(app, host=LOOPBACK, port=port, print=None, access_log=None, backlog=4096)


def start_mirror(port: int, cpus: str | None, log: Path | None = None, missing_share: float = MISSING_SHARE) -> Process:
    """This file's `mirror` command as a process, once it answers."""
    command = pinned(cpus, [sys.executable, str(Path(__file__).resolve()), "mirror", "--port", str(port),
                            "--missing-share", str(missing_share)])
    return start_serving("fault mirror", command, port, log=log, ready_path="/_fault")


def set_mirror_mode(port: int, mode: str) -> None:
    request = urllib.request.Request(f"http://{LOOPBACK}:{port}/_fault?mode={mode}", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def mirror_heads(port: int) -> int:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/_fault", timeout=10) as response:
        return int(json.loads(response.read())["heads"])


# -- the traffic ------------------------------------------------------------------


def aws_address(region: str) -> str:
    """A real address the range data places in AWS `region` (first host of its first prefix)."""
    import ipaddress

    from iprange import AWS, Placement, load_index

    index = load_index(None)
    for prefix, prefix_region in index.providers[AWS].prefixes:
        if prefix_region != region or ":" in prefix:
            continue
        address = str(next(ipaddress.ip_network(prefix).hosts()))
        if index.lookup(address) == Placement(AWS, region):
            return address
    raise SystemExit(f"no address of AWS {region} in the range data")


@dataclass(frozen=True)
class Client:
    name: str
    address: str
    mirror: str | None  # the base the server should use when healthy; None: always upstream


@dataclass
class Sample:
    scheduled: float  # wall clock, seconds
    latency: float  # seconds, from the scheduled send time
    kind: str  # "blob" or "manifest"
    outcome: str  # "mirror", "upstream", "wrong", "error"


class Traffic:
    """An endless realistic request stream: (path, client, kind, digest)."""

    def __init__(self, mirror_base: str, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.catalog = build_catalog(seed, 60)
        self.weights = zipf_weights(len(self.catalog))
        self.fresh = 0
        self.clients = [
            (Client("aws-eu-west-3", EU_WEST_3, f"{mirror_base}/aws-eu-west-3"), 0.40),
            (Client("aws-us-east-1", aws_address("us-east-1"), f"{mirror_base}/aws-us-east-1"), 0.30),
            (Client("unknown", NOBODY, f"{mirror_base}/cdn"), 0.15),
            (Client("google-cloud", GOOGLE_CLOUD, None), 0.15),
        ]

    def next(self) -> tuple[str, Client, str, str | None]:
        rng = self.rng
        client = rng.choices([c for c, _ in self.clients], [w for _, w in self.clients])[0]
        image = rng.choices(self.catalog, self.weights)[0]
        if rng.random() < MANIFEST_SHARE:
            return f"/v2/{image.name}/manifests/{image.tag}", client, "manifest", None
        if rng.random() < FRESH_SHARE:
            self.fresh += 1
            digest = digest_of("fresh", self.fresh)
        else:
            digest = rng.choice(image.blobs)
        return f"/v2/{image.name}/blobs/{digest}", client, "blob", digest


def classify(location: str | None, client: Client, path: str, digest: str | None) -> str:
    upstream = f"{UPSTREAM}/v2/{REGISTRY_PATH}/{path[4:]}"
    if location == upstream:
        return "upstream"
    if digest is not None and client.mirror is not None and in_mirrors(digest, MISSING_SHARE) \
            and location == f"{client.mirror}/containers/images/{digest}":
        return "mirror"
    return "wrong"


async def drive(port: int, rate: float, seconds: float, traffic: Traffic,
                switches: dict[float, str], mirror_port: int) -> list[Sample]:
    """Send `rate` req/s for `seconds` (open loop); switch the mirror at the given offsets."""
    import aiohttp

    samples: list[Sample] = []
    base = f"http://{LOOPBACK}:{port}"
    connector = aiohttp.TCPConnector(limit=2000, keepalive_timeout=60)
    pending: set[asyncio.Task[None]] = set()

    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(scheduled: float, path: str, client: Client, kind: str, digest: str | None) -> None:
            headers = {"X-Forwarded-For": f"{client.address}, 127.0.0.1"}
            try:
                async with session.get(base + path, headers=headers, allow_redirects=False) as response:
                    location = response.headers.get("Location")
                    await response.read()
                outcome = classify(location, client, path, digest) if response.status == 307 else "wrong"
            except (aiohttp.ClientError, TimeoutError):
                outcome = "error"
            samples.append(Sample(scheduled, time.time() - scheduled, kind, outcome))

        loop = asyncio.get_running_loop()
        start_wall, start_mono = time.time(), loop.time()
        offsets = sorted(switches)
        total = int(rate * seconds)
        for i in range(total):
            offset = i / rate
            while offsets and offsets[0] <= offset:
                mode = switches[offsets.pop(0)]
                await loop.run_in_executor(None, set_mirror_mode, mirror_port, mode)
                print(f"  t={offset:5.1f} s: mirror {mode}", flush=True)
            delay = start_mono + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            path, client, kind, digest = traffic.next()
            task = loop.create_task(one(start_wall + offset, path, client, kind, digest))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending)
    return samples


# -- the report ---------------------------------------------------------------------


def percentile(sorted_values: list[float], share: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, int(-(-share * len(sorted_values) // 1)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


@dataclass
class Window:
    name: str
    start: float
    end: float
    rows: dict[str, Any] = field(default_factory=dict)

    def measure(self, samples: list[Sample]) -> dict[str, Any]:
        blobs = [s for s in samples if s.kind == "blob" and self.start <= s.scheduled < self.end]
        latencies = sorted(s.latency * 1000 for s in blobs)
        outcomes = Counter(s.outcome for s in blobs)
        self.rows = {
            "window": self.name,
            "seconds": round(self.end - self.start, 1),
            "blob_requests": len(blobs),
            "p50_ms": round(percentile(latencies, 0.50), 2),
            "p99_ms": round(percentile(latencies, 0.99), 2),
            "max_ms": round(latencies[-1], 1) if latencies else None,
            "to_mirror": outcomes["mirror"],
            "to_upstream": outcomes["upstream"],
            "wrong": outcomes["wrong"],
            "errors": outcomes["error"],
        }
        return self.rows


def breaker_changes(log_path: Path) -> list[tuple[float, str, str]]:
    """(wall time, mirror, state) for every breaker change the server logged."""
    changes = []
    for line in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        message = str(entry.get("message", ""))
        if " circuit breaker " not in message:
            continue
        _, mirror, _, _, state = message.split(" ")
        stamp = datetime.datetime.strptime(entry["time"], "%Y-%m-%dT%H:%M:%S.%fZ")
        changes.append((stamp.replace(tzinfo=datetime.UTC).timestamp(), mirror, state))
    return changes


def windows_from(start: float, fault_at: float, heal_at: float, end: float,
                 changes: list[tuple[float, str, str]], mirrors: set[str]) -> list[Window]:
    """Before, fault (until every mirror's breaker is open, then open), after (until closed, then closed)."""
    # The first change of each mirror counts: later ones are the probes of
    # the open breaker (one request waits for the HEAD deadline each cool-down).
    opened: dict[str, float] = {}
    closed: dict[str, float] = {}
    for t, mirror, state in changes:
        if state == "open" and fault_at <= t < heal_at:
            opened.setdefault(mirror, t)
        elif state == "closed" and t >= heal_at:
            closed.setdefault(mirror, t)
    windows = [Window("before the fault", start, fault_at), Window("fault, all of it", fault_at, heal_at)]
    if mirrors <= opened.keys():
        all_open = max(opened[m] for m in mirrors)
        windows += [Window("fault, until every breaker is open", fault_at, all_open),
                    Window("fault, breakers open", all_open, heal_at)]
    windows.append(Window("after recovery, all of it", heal_at, end))
    if mirrors <= closed.keys():
        all_closed = max(closed[m] for m in mirrors)
        windows += [Window("after, until every breaker closed", heal_at, all_closed),
                    Window("after, breakers closed again", all_closed, end)]
    return windows


def markdown(info: dict[str, Any], rows: list[dict[str, Any]], verdict: str) -> str:
    columns = list(rows[0])
    lines = [
        "# Fault injection: mirrors hang mid-run", "",
        f"Machine: {machine_line(info['machine'])}.", "",
        f"Offered {info['rate']} req/s for {info['seconds']} s (open loop, latency from the scheduled send); "
        f"mirrors hang from t={info['fault_at_s']} s to t={info['heal_at_s']} s. Server settings: defaults "
        "(HEAD deadline 1 s, breaker 5 failures, 10 s cool-down). Blob latency only.", "",
        "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns),
    ]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    lines += ["", verdict, "",
              "Upstream's server in the same situation: every uncached blob waits for its 5 s HEAD "
              "timeout, for as long as the mirror hangs (no breaker).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    mirror = sub.add_parser("mirror", help="run only the switchable mirror")
    mirror.add_argument("--port", type=int, required=True)
    mirror.add_argument("--missing-share", type=float, default=MISSING_SHARE, help="share of blobs answered 404")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered requests per second")
    parser.add_argument("--before", type=float, default=20.0, help="seconds of healthy traffic")
    parser.add_argument("--fault", type=float, default=30.0, help="seconds the mirrors hang")
    parser.add_argument("--after", type=float, default=40.0, help="seconds after recovery")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before 'before', not reported")
    args = parser.parse_args(argv)
    if args.command == "mirror":
        run_mirror(args.port, args.missing_share)
        return 0

    import uvloop

    info: dict[str, Any] = {"machine": machine(), "rate": args.rate}
    server_cpus, generator_cpus = ("0", "1") if can_pin() else (None, None)
    with tempfile.TemporaryDirectory(prefix="archeio-fault-") as tmp_name:
        tmp = Path(tmp_name)
        mirror_port, port = free_port(), free_port()
        base = f"http://{LOOPBACK}:{mirror_port}"
        mirrors_file = write_mirrors_file(tmp / "mirrors.toml", {
            "AWS": {"eu-west-3": f"{base}/aws-eu-west-3", "us-east-1": f"{base}/aws-us-east-1"},
        })
        env = {
            "UPSTREAM_REGISTRY_ENDPOINT": UPSTREAM, "UPSTREAM_REGISTRY_PATH": REGISTRY_PATH,
            "DEFAULT_AWS_BASE_URL": f"{base}/cdn", "ARCHEIO_MIRRORS_FILE": str(mirrors_file),
            "ARCHEIO_LOG_LEVEL": "info", **EMBEDDED_RANGES,
        }
        server_log = tmp / "archeio.log"
        with start_mirror(mirror_port, generator_cpus, tmp / "mirror.log") as mirror_process, \
                start_archeio(env, port, server_cpus, server_log):
            if generator_cpus:
                import os
                os.sched_setaffinity(0, {int(generator_cpus)})
            fault_at = args.warmup + args.before
            heal_at = fault_at + args.fault
            seconds = heal_at + args.after
            info.update(seconds=seconds, fault_at_s=fault_at, heal_at_s=heal_at)
            print(f"driving {args.rate:.0f} req/s for {seconds:.0f} s; mirrors hang at t={fault_at:.0f} s, "
                  f"recover at t={heal_at:.0f} s", flush=True)
            traffic = Traffic(base)
            started = time.time()
            samples = uvloop.run(drive(port, args.rate, seconds, traffic,
                                       {fault_at: "hang", heal_at: "ok"}, mirror_port))
            info["mirror_heads"] = mirror_heads(mirror_port)
            assert mirror_process.alive()
        changes = breaker_changes(server_log)
    mirrors = {f"{base}/aws-eu-west-3", f"{base}/aws-us-east-1", f"{base}/cdn"}
    windows = windows_from(started + args.warmup, started + fault_at, started + heal_at,
                           started + seconds, changes, mirrors)
    rows = [w.measure(samples) for w in windows]
    info["breaker_changes"] = [
        {"t_s": round(t - started, 2), "mirror": m.rsplit("/", 1)[-1], "state": s} for t, m, s in changes
    ]
    info["achieved_rate"] = round(len(samples) / seconds, 1)
    open_row = next((r for r in rows if r["window"] == "fault, breakers open"), None)
    wrong = sum(r["wrong"] + r["errors"] for r in rows[:1] + rows[1:2] + [rows[-1]])
    if open_row is None:
        verdict = "FLOOR NOT MET: the breakers did not all open during the fault."
    elif open_row["p99_ms"] < P99_FLOOR_MS and wrong == 0:
        verdict = (f"Floor met: with the breakers open, blob p99 {open_row['p99_ms']} ms < {P99_FLOOR_MS} ms "
                   f"at {args.rate:.0f} req/s; no wrong redirect or error.")
    else:
        verdict = (f"FLOOR NOT MET: with the breakers open, blob p99 {open_row['p99_ms']} ms "
                   f"(floor {P99_FLOOR_MS} ms); wrong or failed answers: {wrong}.")
    report = markdown(info, rows, verdict)
    print()
    print(report)
    print("breaker changes (t from start):", ", ".join(
        f"{c['t_s']} s {c['mirror']} {c['state']}" for c in info["breaker_changes"]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fault-injection.json").write_text(json.dumps({**info, "windows": rows, "verdict": verdict}, indent=2))
    (RESULTS / "fault-injection.md").write_text(report)
    return 0 if verdict.startswith("Floor met") else 1


if __name__ == "__main__":
    sys.exit(main())
