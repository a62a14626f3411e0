"""Recorded traffic, replayed: an access log read into a schedule of requests.

Capacity planning on real traffic shapes needs the real mix (which paths,
which methods), the clients' places (their addresses, sent again as
X-Forwarded-For) and the arrival times (bursts included). This module
reads two kinds of record:

- archeio's own JSON access lines (`ARCHEIO_ACCESS_LOG`, see
  docs/operations.md): `httpRequest.requestMethod`, `requestUrl`,
  `remoteIp`, `status` and `latency`, and the line's `time`. The line is
  written when the answer is ready, so the request arrived `latency`
  before `time`. Other log lines in the same stream are skipped.
- a plain list, one request a line, fields separated by white space:
  `[TIME] METHOD TARGET ADDRESS`. TIME is optional (Unix seconds or ISO
  8601); without it the requests are spread evenly at a given rate.

`schedule()` turns the entries into offsets from the first arrival,
divided by the speed-up; `partition()` splits them between load generator
processes by client address, so each client's requests stay in one
process and in their order.

Nothing here imports Locust: the locustfile uses it, and so do the tests.
"""

from __future__ import annotations

import datetime
import json
import zlib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Entry:
    """One recorded request."""

    arrival: float | None  # seconds (any epoch); None: the record has no time
    method: str
    target: str  # path and query, as requested
    address: str | None  # the client's address; None: not recorded
    status: int | None  # the status recorded with it, when the record has one


@dataclass(frozen=True)
class Scheduled:
    """A request and when to send it, in seconds after the replay starts."""

    due: float
    entry: Entry


class ReplayError(ValueError):
    """The log cannot be replayed as asked."""


def _seconds(text: str) -> float:
    """Unix seconds, or an ISO 8601 date and time (`Z` or an offset; naive means UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


def _from_json(doc: dict[str, object]) -> Entry | None:
    request = doc.get("httpRequest")
    if not isinstance(request, dict) or "requestUrl" not in request:
        return None  # another logger's line
    arrival = None
    if "time" in doc:
        arrival = _seconds(str(doc["time"]))
        latency = str(request.get("latency") or "0s").removesuffix("s")
        arrival -= float(latency or 0)
    status = request.get("status")
    return Entry(arrival, str(request.get("requestMethod") or "GET"), str(request["requestUrl"]),
                 str(request["remoteIp"]) if request.get("remoteIp") else None,
                 int(status) if isinstance(status, int | str) and str(status).isdigit() else None)


def _from_plain(line: str) -> Entry:
    fields = line.split()
    if len(fields) == 4:
        return Entry(_seconds(fields[0]), fields[1].upper(), fields[2], fields[3], None)
    if len(fields) == 3:
        return Entry(None, fields[0].upper(), fields[1], fields[2], None)
    raise ReplayError(f"expected '[TIME] METHOD TARGET ADDRESS', got {line!r}")


def parse_log(lines: Iterable[str]) -> tuple[list[Entry], int]:
    """The requests recorded in `lines`, in arrival order; and how many lines were skipped.

    Skipped: blank lines, `#` comments, JSON lines that are not access
    lines (start-up messages, warnings).
    """
    entries: list[Entry] = []
    skipped = 0
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            skipped += 1
            continue
        if line.startswith("{"):
            try:
                entry = _from_json(json.loads(line))
            except (ValueError, TypeError) as exc:
                raise ReplayError(f"not an access line: {line[:200]!r} ({exc})") from None
            if entry is None:
                skipped += 1
                continue
        else:
            entry = _from_plain(line)
        entries.append(entry)
    timed = [e.arrival is not None for e in entries]
    if any(timed) and not all(timed):
        raise ReplayError("some records have a time and some do not: cannot keep the arrival times")
    if all(timed):
        # Access lines are written when each answer is ready, not in arrival order.
        entries.sort(key=lambda e: e.arrival)  # type: ignore[arg-type, return-value]
    return entries, skipped


def schedule(entries: list[Entry], speedup: float = 1.0, rate: float | None = None) -> list[Scheduled]:
    """When to send each entry: recorded gaps divided by `speedup`, or evenly at `rate` without times."""
    if speedup <= 0:
        raise ReplayError("the speed-up must be > 0")
    if not entries:
        return []
    if entries[0].arrival is None:
        if not rate or rate <= 0:
            raise ReplayError("the records carry no times: give a rate (BENCH_REPLAY_RATE, requests/s)")
        return [Scheduled(i / rate, entry) for i, entry in enumerate(entries)]
    first = entries[0].arrival
    return [Scheduled((entry.arrival - first) / speedup, entry) for entry in entries]  # type: ignore[operator]


def partition(plan: list[Scheduled], index: int, count: int) -> list[Scheduled]:
    """The share of process `index` of `count`: whole clients, picked by a hash of their address."""
    if count <= 1:
        return plan
    return [s for s in plan if zlib.crc32((s.entry.address or "").encode()) % count == index]


def span_seconds(plan: list[Scheduled]) -> float:
    return plan[-1].due if plan else 0.0
