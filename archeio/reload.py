"""Live range updates: re-read ARCHEIO_RANGES_DIR, judge each provider, swap the index.

Downloading is the updater's job (`iprange update`, from a cron job or a
sidecar); the server only re-reads the directory, on SIGHUP and every
`ARCHEIO_RANGES_REFRESH` seconds when that is set.

A reload is judged per provider, because one bad feed must not cost the
others their update. A provider's new file is refused, and its loaded data
kept, when it is
- unparseable (not JSON, wrong shape, a prefix that is not a prefix),
- older than the loaded data (its serial: AWS createDate, Google
  creationTime, Azure changeNumber),
- losing more than `ARCHEIO_RANGES_MAX_LOSS` of the loaded prefixes (a
  truncated download that still parses),
- gone from the directory (a half-finished copy must not unroute a cloud), or
- empty, for a provider the deployment requires (providers.py): whatever
  `ARCHEIO_RANGES_MAX_LOSS` allows, so that a server that started never
  serves without one.

The new index is built aside (in a thread, so the event loop keeps
answering) and swapped in with one assignment: a request sees the old index
or the new one, never a half-built one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from iprange import CloudIndex, ProviderRanges, RangeFileError, describe
from iprange.judge import LOSS, OLDER, SAME, check_prefixes, compare
from iprange.parse import FILE_NAMES, parse_file

from .app import RequestFlow

log = logging.getLogger("archeio.reload")

# Outcomes per provider, also the `outcome` label of archeio_ranges_reloads_total.
LOADED = "loaded"
UNCHANGED = "unchanged"
REFUSED_UNPARSEABLE = "refused_unparseable"
REFUSED_OLDER = "refused_older"
REFUSED_LOSS = "refused_loss"
REFUSED_MISSING = "refused_missing"


@dataclass(frozen=True)
class Verdict:
    """What a reload did with one provider's file."""

    cloud: str
    outcome: str
    reason: str = ""
    # The data to serve for this provider after the reload.
    keep: ProviderRanges | None = None

    @property
    def refused(self) -> bool:
        return self.outcome.startswith("refused")


def judge(
    cloud: str, loaded: ProviderRanges | None, candidate: ProviderRanges | RangeFileError | None,
    max_loss: float, required: bool = False,
) -> Verdict:
    """The verdict on one provider's file against the data loaded now (pure).

    A `required` provider (providers.py) is never left without prefixes,
    whatever `max_loss` allows (1 allows losing them all).
    """
    if candidate is None:
        if loaded is None:
            return Verdict(cloud, UNCHANGED)
        return Verdict(cloud, REFUSED_MISSING, f"{FILE_NAMES[cloud]} is gone", loaded)
    if isinstance(candidate, RangeFileError):
        return Verdict(cloud, REFUSED_UNPARSEABLE, str(candidate), loaded)
    if required and not candidate.prefixes:
        return Verdict(cloud, REFUSED_LOSS, "no prefixes, and the provider is required", loaded)
    if loaded is None:
        return Verdict(cloud, LOADED, "new provider", candidate)
    outcome, reason = compare(loaded, candidate, max_loss)
    if outcome == SAME:
        return Verdict(cloud, UNCHANGED, reason, loaded)
    if outcome in (OLDER, LOSS):
        return Verdict(cloud, REFUSED_OLDER if outcome == OLDER else REFUSED_LOSS, reason, loaded)
    return Verdict(cloud, LOADED, reason, candidate)


def _read(ranges_dir: Path, cloud: str) -> ProviderRanges | RangeFileError | None:
    path = ranges_dir / FILE_NAMES[cloud]
    if not path.exists():
        return None
    try:
        provider = parse_file(cloud, path)
        check_prefixes(provider)
    except RangeFileError as exc:
        return exc
    return provider


def plan_reload(
    loaded: Mapping[str, ProviderRanges], ranges_dir: Path, max_loss: float, required: Collection[str] = (),
) -> tuple[CloudIndex | None, list[Verdict]]:
    """Read and judge every provider; the new index, or None when nothing changed."""
    verdicts = [
        judge(cloud, loaded.get(cloud), _read(ranges_dir, cloud), max_loss, cloud in required)
        for cloud in FILE_NAMES
    ]
    if not any(v.outcome == LOADED for v in verdicts):
        return None, verdicts
    return CloudIndex(v.keep for v in verdicts if v.keep is not None), verdicts


class RangeReloader:
    """Reloads one RequestFlow's range index from a directory, one reload at a time."""

    def __init__(
        self, flow: RequestFlow, ranges_dir: Path | None, max_loss: float,
        counts: Counter[tuple[str, str]], required: Collection[str] = (),
    ) -> None:
        self.flow = flow
        self.ranges_dir = ranges_dir
        self.max_loss = max_loss
        self.required = tuple(required)
        self.counts = counts
        # cloud -> when its current data was swapped in.
        self.loaded_at: dict[str, float] = dict.fromkeys(flow.index.providers, flow.index_loaded_at)
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[list[Verdict]]] = set()

    def request(self, trigger: str) -> None:
        """Start a reload from a signal handler (no await possible there)."""
        task = asyncio.get_running_loop().create_task(self.reload(trigger))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, trigger: str) -> list[Verdict]:
        """Re-read the directory now; returns the verdict per provider."""
        if self.ranges_dir is None:
            log.warning("reload (%s) ignored: no ARCHEIO_RANGES_DIR, the embedded data stays", trigger)
            return []
        async with self._lock:
            loaded = self.flow.index.providers
            try:
                index, verdicts = await asyncio.to_thread(
                    plan_reload, loaded, self.ranges_dir, self.max_loss, self.required
                )
            except Exception:  # a bug, or a prefix only the radix tree refuses: keep serving
                log.exception("range reload (%s) failed; the loaded data stays", trigger)
                return []
            if index is not None:
                self.flow.swap_index(index)
                now = time.time()
                for v in verdicts:
                    if v.outcome == LOADED:
                        self.loaded_at[v.cloud] = now
            self._report(trigger, verdicts, index)
            return verdicts

    def _report(self, trigger: str, verdicts: list[Verdict], index: CloudIndex | None) -> None:
        for v in verdicts:
            if v.keep is None and v.outcome == UNCHANGED:
                continue  # a provider that has never had a file
            self.counts[(v.cloud, v.outcome)] += 1
            if v.refused:
                log.warning(
                    "refused %s ranges: %s; keeping the loaded data", v.cloud, v.reason,
                    extra={"fields": {"event": "ranges_reload", "cloud": v.cloud, "outcome": v.outcome,
                                      "reason": v.reason, "trigger": trigger}},
                )
        if index is not None:
            log.info(
                "reloaded ranges: %s", describe(index),
                extra={"fields": {"event": "ranges_reload", "trigger": trigger,
                                  "outcomes": {v.cloud: v.outcome for v in verdicts}}},
            )

    async def refresh_every(self, seconds: float) -> None:
        """Reload every `seconds` for ever (a task, cancelled at shutdown)."""
        while True:
            await asyncio.sleep(seconds)
            await self.reload("refresh")

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
