"""What the mirror tells its operator: a live bar on a terminal, log lines
otherwise, and the summary at the end.

The counters here are the run's only tally; the summary and the exit status
are made from them. The bar is redrawn at most ten times a second, however
many chunks arrive, and events (copies, failures) are printed above it.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

BAR = "bar"
LOG = "log"


@dataclass
class Tally:
    """Counts of one run; `failed > 0` or `images_failed > 0` means exit status 1."""

    blobs_found: int = 0
    bytes_found: int = 0
    copied: int = 0
    bytes_copied: int = 0
    skipped: int = 0
    bytes_skipped: int = 0
    failed: int = 0
    images_mirrored: int = 0
    images_already_done: int = 0
    images_unsupported: int = 0
    images_failed: int = 0
    bytes_in_flight: int = 0

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.images_failed == 0


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Counts events and shows them, as a bar (`BAR`) or as log lines (`LOG`)."""

    def __init__(self, mode: str = LOG, stream: TextIO | None = None, dry_run: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.mode = mode
        self.stream = stream or sys.stderr
        self.dry_run = dry_run
        self.tally = Tally()
        self._clock = clock
        self.started = clock()
        self._last_draw = 0.0
        self._bar_shown = False
        # (time, bytes done) samples of the last few seconds, for the rate.
        self._samples: deque[tuple[float, int]] = deque(maxlen=64)

    @staticmethod
    def mode_for(choice: str, stream: TextIO) -> str:
        """`auto` means a bar on a terminal and log lines anywhere else."""
        if choice == "auto":
            return BAR if stream.isatty() else LOG
        return choice

    # -- events --------------------------------------------------------------

    def found(self, size: int) -> None:
        self.tally.blobs_found += 1
        self.tally.bytes_found += size
        self._draw()

    def skipped(self, size: int) -> None:
        self.tally.skipped += 1
        self.tally.bytes_skipped += size
        self._draw()

    def moved(self, count: int) -> None:
        """Bytes of a blob in flight passed through (negative: a failed try rolled back)."""
        self.tally.bytes_in_flight += count
        self._draw()

    def copied(self, digest: str, size: int, where: int, in_flight: int = 0) -> None:
        """A blob is in `where` more buckets; `in_flight` of its bytes were counted by `moved`."""
        self.tally.copied += 1
        self.tally.bytes_copied += size
        self.tally.bytes_in_flight -= in_flight
        verb = "would copy" if self.dry_run else "copied"
        self.event(f"{verb} {digest} ({human_bytes(size)}) to {where} bucket{'s' if where != 1 else ''}")

    def failed(self, what: str, error: object) -> None:
        self.tally.failed += 1
        self.event(f"FAILED {what}: {error}")

    def image_failed(self, what: str, error: object) -> None:
        self.tally.images_failed += 1
        self.event(f"FAILED {what}: {error}")

    def unsupported(self, what: str, media_type: str) -> None:
        self.tally.images_unsupported += 1
        self.event(f"not mirrored {what}: unsupported manifest type {media_type}")

    def image_mirrored(self, what: str, blobs: int) -> None:
        self.tally.images_mirrored += 1
        if self.mode == LOG:
            verb = "would finish" if self.dry_run else "finished"
            self.event(f"{verb} image {what} ({blobs} blobs)")

    def untagged_found(self, repository: str, count: int) -> None:
        """The registry's listing named manifests without a tag, which are mirrored too."""
        self.event(f"{repository}: {count} untagged manifest{'s' if count != 1 else ''} listed by the registry, "
                   "mirrored too")

    def image_already_done(self) -> None:
        self.tally.images_already_done += 1
        self._draw()

    def note(self, message: str) -> None:
        self.event(message)

    # -- output ----------------------------------------------------------------

    def event(self, message: str) -> None:
        """A line of its own; on a terminal, printed above the bar."""
        if self.mode == BAR and self._bar_shown:
            self.stream.write("\r\x1b[K")
        self.stream.write(message + "\n")
        self.stream.flush()
        self._bar_shown = False
        self._draw(force=self.mode == BAR)

    def bytes_done(self) -> int:
        t = self.tally
        return t.bytes_copied + t.bytes_in_flight

    def rate(self) -> float:
        """Bytes a second over the last few seconds."""
        now = self._clock()
        self._samples.append((now, self.bytes_done()))
        while len(self._samples) > 2 and now - self._samples[0][0] > 5.0:
            self._samples.popleft()
        first_time, first_bytes = self._samples[0]
        elapsed = now - first_time
        if elapsed < 0.2:
            elapsed = now - self.started
            return self.bytes_done() / elapsed if elapsed > 0 else 0.0
        return (self.bytes_done() - first_bytes) / elapsed

    def bar_line(self, width: int = 24) -> str:
        t = self.tally
        done_blobs = t.copied + t.skipped + t.failed
        to_move = max(t.bytes_found - t.bytes_skipped, 0)
        fraction = min(1.0, self.bytes_done() / to_move) if to_move else (1.0 if done_blobs else 0.0)
        filled = int(fraction * width)
        rate = self.rate()
        remaining = to_move - self.bytes_done()
        eta = human_seconds(remaining / rate) if rate > 0 and remaining > 0 else "--:--"
        return (
            f"[{'#' * filled}{'.' * (width - filled)}] {done_blobs}/{t.blobs_found} blobs "
            f"{human_bytes(self.bytes_done())}/{human_bytes(to_move)} "
            f"{human_bytes(rate)}/s ETA {eta}"
            + (f" {t.failed} failed" if t.failed else "")
        )

    def _draw(self, force: bool = False) -> None:
        if self.mode != BAR:
            return
        now = self._clock()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        self.stream.write("\r\x1b[K" + self.bar_line())
        self.stream.flush()
        self._bar_shown = True

    def finish(self, source_requests: int) -> str:
        """Close the bar and print the summary; returns the summary line."""
        if self.mode == BAR and self._bar_shown:
            self.stream.write("\r\x1b[K")
        t = self.tally
        elapsed = max(self._clock() - self.started, 1e-9)
        verb = "would copy" if self.dry_run else "copied"
        line = (
            f"summary: {verb} {t.copied} blobs ({human_bytes(t.bytes_copied)}), "
            f"skipped {t.skipped} ({human_bytes(t.bytes_skipped)}), failed {t.failed}; "
            f"images: {t.images_mirrored} mirrored, {t.images_already_done} already done, "
            f"{t.images_unsupported} unsupported, {t.images_failed} failed; "
            f"{source_requests} source requests in {elapsed:.1f} s"
            + ("" if self.dry_run else f" ({human_bytes(t.bytes_copied / elapsed)}/s)")
        )
        self.stream.write(line + "\n")
        self.stream.flush()
        return line
