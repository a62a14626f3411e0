"""User-space instructions a request of the real server, counted by callgrind (`benchmarks/instructions`).

Wall-clock figures on a shared two-core machine move by more than the 5 %
a hot-path change must be judged by; instruction counts do not. This
starts the real `archeio serve` (its command line, as the other benchmarks
do: harness.py) under `valgrind --tool=callgrind`, once per HTTP engine
(`--http`, default both), and for each path:

- `blob-aws`: a blob from an AWS eu-west-3 client whose mirror (the
  stand-in bucket) holds it, the cache warm: the hot path;
- `blob-unknown`: the same blob from a client in no cloud's ranges, to
  the default mirror after the same cached check;
- `manifest`: a manifest by tag, redirected upstream;

and for each connection mode (`--modes`):

- `keep-alive`: every request on one connection, one at a time;
- `close`: every request with `Connection: close` on a new connection
  (accepting, and closing, included);

it sends `--requests N1,N2` requests in two phases, each between a
`callgrind_control --zero` and a reading of the totals
(`callgrind_control -e`, every thread summed). The figure is
(T2 - T1) / (N2 - N1): whatever a phase costs once (its connection, the
client's first request, the control's own interruption) cancels, and so
does everything before, start-up included. Every answer is checked (307
and the exact Location). Before the phases, the path is warmed with N1
requests in the same mode.

What is counted is the server process's user space, all of it: the
interpreter, uvloop, httptools, libc. Not the kernel. Timers keep running
while a phase runs (under callgrind a request takes about a millisecond),
so the run also reports the server's instructions a second when idle:
that rate times a request's wall time under callgrind bounds what the
timers add to a figure.

The server inherits this command's environment (harness.py
`start_archeio`), so a setting can be measured on and off from the shell:
`ARCHEIO_ACCESS_LOG=1 benchmarks/instructions --http httptools` measures
with every request access-logged (the server's log goes to a file).

The code measured is the `archeio` the interpreter imports: this
checkout's (the virtualenv's editable install) or, with `--tree PATH`,
another checkout's (its directory first on PYTHONPATH), so the code
before a change is measured by this same script. `PYTHONHASHSEED` is
fixed (`--hash-seed`) so that two runs of the same code agree.

`--bare-aiohttp` also measures bare_aiohttp.py (aiohttp's `web.Server`
answering a fixed 307, which `benchmarks/throughput --bare-aiohttp` runs)
the same way, with the manifest and unknown-client blob requests: the
ceiling of the aiohttp engine, in the same units.

Prints a table; `--json` also writes results/instructions.{json,md} and a
line in instructions-history.csv (date, CPU model, commit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import (
    BENCHMARKS,
    LOOPBACK,
    RESULTS,
    add_tree_argument,
    append_history,
    engine_problem,
    engine_settings,
    free_port,
    machine,
    machine_line,
    start_archeio,
    start_serving,
)
from throughput import (
    BARE,
    BLOB_PATH,
    DIGEST,
    MANIFEST_PATH,
    UNKNOWN_CLIENT,
    Rig,
    Target,
    archeio_targets,
    check_redirect,
    start_rig,
)

MODES = ("keep-alive", "close")
DEFAULT_ENGINES = "httptools,aiohttp"
# Start-up under callgrind is 50-100 times slower than native (about a minute here).
START_TIMEOUT = 600.0
# Before zeroing and before reading, let the server finish what the last
# request left (closing its connection): the same pause in every phase.
SETTLE_SECONDS = 0.3
_TOTAL_ROW = re.compile(r"^\s*Th\s+\d+\s+([\d,]+)", re.M)


# -- callgrind ---------------------------------------------------------------

def parse_totals(output: str) -> int:
    """Instructions (Ir) since the last zero, summed over threads, from `callgrind_control -e PID`.

    The output has a `Totals:` header naming the events, then one row per
    thread (`Th 1  2,419,510,508`).
    """
    header = re.search(r"^\s*Totals:\s+(\S+)", output, re.M)
    if not header or header[1] != "Ir":
        raise RuntimeError(f"callgrind_control -e: no Ir totals in its output:\n{output}")
    rows = _TOTAL_ROW.findall(output[header.end():])
    if not rows:
        raise RuntimeError(f"callgrind_control -e: no thread rows in its output:\n{output}")
    return sum(int(row.replace(",", "")) for row in rows)


@dataclass
class Callgrind:
    """callgrind_control of one process running under callgrind."""

    pid: int
    control: str = "callgrind_control"

    def _run(self, *args: str) -> str:
        done = subprocess.run([self.control, *args, str(self.pid)], capture_output=True, text=True,
                              timeout=120, check=True)
        return done.stdout

    def zero(self) -> None:
        self._run("--zero")

    def instructions(self) -> int:
        return parse_totals(self._run("-e"))


def valgrind_wrapper(tmp: Path) -> list[str]:
    """The command prefix that runs the server under callgrind, its files in `tmp`."""
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/callgrind.out.%p",
            f"--log-file={tmp}/valgrind.%p.log"]


# -- the client --------------------------------------------------------------

def request_bytes(target: Target, close: bool) -> bytes:
    """The request wrk sends for this target (its Host, the X-Forwarded-For), optionally closing."""
    return (f"GET {target.path} HTTP/1.1\r\nHost: {LOOPBACK}:{target.port}\r\n"
            f"X-Forwarded-For: {target.forwarded}\r\n" + ("Connection: close\r\n" if close else "")
            + "\r\n").encode("latin-1")


def check_answer(head: bytes, expected_location: str | None) -> int:
    """The body length a 307 head announces; an error unless it is a 307 to `expected_location`."""
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    if lines[0].split(" ")[1:2] != ["307"] or (expected_location and fields.get("location") != expected_location):
        raise RuntimeError(f"expected a 307 to {expected_location!r}, got: {head!r}")
    return int(fields.get("content-length", "0"))


def _read_answer(sock: socket.socket, buffer: bytearray, expected_location: str | None) -> None:
    """Read one answer (head and body) from `sock`; what follows it stays in `buffer`."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"connection closed before a whole answer: {bytes(buffer)!r}")
        buffer += chunk
    length = check_answer(bytes(buffer[:end]), expected_location)
    while len(buffer) < end + 4 + length:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed inside a body")
        buffer += chunk
    del buffer[:end + 4 + length]


def send_requests(port: int, request: bytes, count: int, close: bool, expected_location: str | None) -> None:
    """`count` requests, one at a time: on one connection, or each on its own (read to the server's close)."""
    buffer = bytearray()
    if not close:
        with socket.create_connection((LOOPBACK, port), timeout=60) as sock:
            for _ in range(count):
                sock.sendall(request)
                _read_answer(sock, buffer, expected_location)
        return
    for _ in range(count):
        with socket.create_connection((LOOPBACK, port), timeout=60) as sock:
            sock.sendall(request)
            _read_answer(sock, buffer, expected_location)
            if sock.recv(1):
                raise RuntimeError("the server sent more after the answer to `Connection: close`")


# -- the measurement ---------------------------------------------------------

def phase(counter: Callgrind, target: Target, close: bool, count: int) -> tuple[int, float]:
    """Instructions the server spent on `count` requests (and one phase's fixed cost); wall seconds."""
    request = request_bytes(target, close)
    time.sleep(SETTLE_SECONDS)
    counter.zero()
    started = time.monotonic()
    send_requests(target.port, request, count, close, target.expected_location)
    elapsed = time.monotonic() - started
    time.sleep(SETTLE_SECONDS)
    return counter.instructions(), elapsed


def per_request(first: tuple[int, int], second: tuple[int, int]) -> float:
    """Instructions a request from two phases of (requests, instructions): what one more request costs."""
    (n1, t1), (n2, t2) = first, second
    if n2 <= n1:
        raise ValueError("the second phase must send more requests than the first")
    return (t2 - t1) / (n2 - n1)


def measure_case(counter: Callgrind, target: Target, close: bool, counts: tuple[int, int],
                 repeats: int) -> dict[str, Any]:
    """One path in one connection mode: warm it, then `repeats` pairs of phases."""
    send_requests(target.port, request_bytes(target, close), counts[0], close, target.expected_location)
    figures, phases = [], []
    for _ in range(repeats):
        found = []
        for count in counts:
            instructions, seconds = phase(counter, target, close, count)
            found.append((count, instructions))
            phases.append({"requests": count, "instructions": instructions, "seconds": round(seconds, 3)})
        figures.append(per_request(found[0], found[1]))
    wall = sum(p["seconds"] for p in phases) / sum(p["requests"] for p in phases)
    return {
        "instructions_per_request": round(statistics.median(figures)),
        "min": round(min(figures)), "max": round(max(figures)),
        "repeats": [round(f, 1) for f in figures],
        "wall_ms_per_request_under_callgrind": round(wall * 1e3, 3),
        "phases": phases,
    }


def idle_rate(counter: Callgrind, seconds: float) -> float:
    """The server's instructions a second with no requests (its timers)."""
    time.sleep(SETTLE_SECONDS)
    counter.zero()
    time.sleep(seconds)
    return counter.instructions() / seconds


def measure_targets(counter: Callgrind, engine: str, targets: Sequence[Target], args: argparse.Namespace,
                    log: Callable[[str], None]) -> tuple[list[dict[str, Any]], float]:
    """Every target in every mode (`args.modes`), then the idle rate: (rows, idle instructions a second)."""
    rows = []
    for target in targets:
        for mode in args.modes:
            found = measure_case(counter, target, mode == "close", args.counts, args.repeats)
            rows.append({"path": target.name, "engine": engine, "connection": mode, **found})
            spread = f" ({found['min']}-{found['max']})" if args.repeats > 1 else ""
            log(f"  {target.name:<13} {engine:<12} {mode:<10} {found['instructions_per_request']:>9,}"
                f"{spread} instructions/request")
    idle = idle_rate(counter, args.idle_seconds)
    log(f"  idle: {idle:,.0f} instructions/s")
    return rows, idle


def measure_engine(engine: str, rig: Rig, tmp: Path, args: argparse.Namespace,
                   log: Callable[[str], None]) -> tuple[list[dict[str, Any]], float]:
    """One `archeio serve` under callgrind: every path in every mode; and its idle rate."""
    port = free_port()
    env = {**rig.env, **engine_settings(engine), "PYTHONHASHSEED": str(args.hash_seed)}
    if args.signature_upstream:
        env["SIGNATURE_UPSTREAM_ENDPOINT"] = args.signature_upstream
    log(f"{engine}: starting archeio serve under callgrind (a minute or so)")
    with start_archeio(env, port, log=tmp / f"archeio-{engine}.log", tree=args.tree,
                       wrapper=valgrind_wrapper(tmp), timeout=START_TIMEOUT) as server:
        counter = Callgrind(server.pid)
        targets = archeio_targets(engine, "", port, server.pid, rig.mirror, rig.default_mirror)
        for target in targets:
            # Also the blob's existence check (the cache is warm after it),
            # which first waits for aiohttp's client to be imported: slow here.
            check_redirect(target, timeout=START_TIMEOUT)
        rows, idle = measure_targets(counter, engine, targets, args, log)
        server.stop(timeout=120)
    return rows, idle


def measure_bare(rig: Rig, tmp: Path, args: argparse.Namespace,
                 log: Callable[[str], None]) -> tuple[list[dict[str, Any]], float]:
    """bare_aiohttp.py under callgrind, as `measure_engine` measures an engine: the aiohttp engine's ceiling.

    It answers every request with the same 307, so its two paths differ only
    in the request's length: the requests of `manifest` and `blob-unknown`.
    """
    port = free_port()
    location = f"{rig.default_mirror}/containers/images/{DIGEST}"
    command = [*valgrind_wrapper(tmp), sys.executable, str(BENCHMARKS / "bare_aiohttp.py"),
               "--port", str(port), "--location", location]
    env = {**os.environ, "PYTHONHASHSEED": str(args.hash_seed)}
    log(f"{BARE}: starting bare_aiohttp.py under callgrind")
    with start_serving(BARE, command, port, env=env, log=tmp / "bare-aiohttp.log", timeout=START_TIMEOUT) as server:
        targets = [Target(name, BARE, None, port, path, UNKNOWN_CLIENT, location, server.pid)
                   for name, path in (("manifest", MANIFEST_PATH), ("blob-unknown", BLOB_PATH))]
        rows, idle = measure_targets(Callgrind(server.pid), BARE, targets, args, log)
        server.stop(timeout=120)
    return rows, idle


def render_table(rows: Sequence[dict[str, Any]], idle: dict[str, float] | None = None) -> list[str]:
    """The table; with the engines' idle rates, also each figure less what the timers may have added.

    Under callgrind a request takes about a millisecond, 50 times its real
    time, so the server's timers (the loop-lag probe's 100 a second among
    them) run 50 times more often per request than they do serving: the
    idle rate times that wall time bounds their share, and the figure less
    it bounds the request's own cost from below.
    """
    idle = idle or {}
    lines = ["| path | engine | connection | instructions/request | repeats (min-max) | "
             "ms/request under callgrind | less the timers' share (lower bound) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        rate = idle.get(row["engine"])
        less = "" if rate is None else (
            f"{row['instructions_per_request'] - rate * row['wall_ms_per_request_under_callgrind'] / 1e3:,.0f}")
        lines.append(f"| {row['path']} | {row['engine']} | {row['connection']} | "
                     f"{row['instructions_per_request']:,} | {row['min']:,}-{row['max']:,} | "
                     f"{row['wall_ms_per_request_under_callgrind']} | {less} |")
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    idle = ", ".join(f"{engine} {rate:,.0f}" for engine, rate in result["idle_instructions_per_second"].items())
    lines = [
        "# Instructions a request (benchmarks/instructions)",
        "",
        f"Machine: {machine_line(result['machine'])}.  ",
        f"Code: {result['tree'] or 'this checkout'}. {result['valgrind']} (callgrind), PYTHONHASHSEED="
        f"{result['hash_seed']}, SIGNATURE_UPSTREAM_ENDPOINT "
        f"{result.get('signature_upstream') or 'unset'}. Phases of {result['requests'][0]} and "
        f"{result['requests'][1]} requests, "
        f"one at a time, {result['repeats']} pair(s) of phases; the figure is the difference of the "
        "phases' totals over the difference of their requests (median over the pairs).",
        "",
        *render_table(result["rows"], result["idle_instructions_per_second"]),
        "",
        f"Idle (timers only), instructions a second: {idle}.",
    ]
    return "\n".join(lines) + "\n"


def history_row(result: dict[str, Any]) -> dict[str, object]:
    info = result["machine"]
    found: dict[str, object] = {"date": info["date"], "code": info["archeio_commit"],
                                "cpu_model": info.get("cpu_model"), "tree": result["tree"] or ""}
    for row in result["rows"]:
        key = re.sub(r"[^a-z0-9]+", "_", f"{row['path']} {row['engine']} {row['connection']}")
        found[key] = row["instructions_per_request"]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/instructions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http", default=DEFAULT_ENGINES,
                        help=f"HTTP engines, comma-separated (ARCHEIO_HTTP; default {DEFAULT_ENGINES})")
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"connection modes, comma-separated, of {', '.join(MODES)} (default both)")
    parser.add_argument("--requests", default="400,2000",
                        help="requests in the first and the second phase (default 400,2000)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="pairs of phases per path and mode; the figure is their median (default 3)")
    parser.add_argument("--idle-seconds", type=float, default=2.0,
                        help="how long the idle rate is counted (default 2)")
    parser.add_argument("--hash-seed", type=int, default=0, help="the server's PYTHONHASHSEED (default 0)")
    parser.add_argument("--signature-upstream", metavar="URL", default="",
                        help="the server's SIGNATURE_UPSTREAM_ENDPOINT (default unset): the cost of the "
                             "signature fallback on paths that never need its check")
    add_tree_argument(parser)
    parser.add_argument("--json", action="store_true",
                        help="write results/instructions.{json,md} and a line in instructions-history.csv")
    parser.add_argument("--results", type=Path, default=RESULTS, help="directory for the result files")
    parser.add_argument("--bare-aiohttp", action="store_true",
                        help="also measure aiohttp's bare web.Server answering a fixed 307 (bare_aiohttp.py), "
                             "the ceiling of the aiohttp engine, on the manifest and blob-unknown requests")
    args = parser.parse_args(argv)

    engines = [e.strip() for e in args.http.split(",") if e.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.counts = tuple(int(n) for n in args.requests.split(","))
    if len(args.counts) != 2 or not 0 < args.counts[0] < args.counts[1]:
        parser.error("--requests takes two counts, the second larger: N1,N2")
    if unknown := set(args.modes) - set(MODES):
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    for tool in ("valgrind", "callgrind_control"):
        if not shutil.which(tool):
            print(f"benchmarks/instructions: {tool} is not installed (apt-get install valgrind)", file=sys.stderr)
            return 2
    if problem := engine_problem(engines, args.tree):
        print(f"benchmarks/instructions: {problem}", file=sys.stderr)
        return 2
    version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    info = machine(args.tree)
    print(f"machine: {machine_line(info)}")
    print(f"code: {args.tree.resolve() if args.tree else 'this checkout'}; {version}; "
          f"phases of {args.counts[0]} and {args.counts[1]} requests")

    rows: list[dict[str, Any]] = []
    idle: dict[str, float] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="archeio-instructions-")))
        rig = start_rig(stack, tmp, None)
        for engine in engines:
            found, idle[engine] = measure_engine(engine, rig, tmp, args, print)
            rows += found
        if args.bare_aiohttp:
            found, idle[BARE] = measure_bare(rig, tmp, args, print)
            rows += found

    result: dict[str, Any] = {
        "machine": info, "valgrind": version, "tree": str(args.tree.resolve()) if args.tree else None,
        "hash_seed": args.hash_seed, "requests": list(args.counts), "repeats": args.repeats,
        "signature_upstream": args.signature_upstream or None,
        "rows": rows, "idle_instructions_per_second": {k: round(v) for k, v in idle.items()},
    }
    print()
    print(render_markdown(result))
    if args.json:
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / "instructions.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.results / "instructions.md").write_text(render_markdown(result))
        append_history(args.results / "instructions-history.csv", history_row(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
