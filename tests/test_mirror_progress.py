"""What the mirror shows: the live bar, plain log lines, the summary."""

from __future__ import annotations

import io

import pytest

from archeio.mirror.progress import BAR, LOG, Progress, human_bytes, human_seconds


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_means_a_bar_on_a_terminal_and_log_lines_elsewhere() -> None:
    assert Progress.mode_for("auto", Terminal()) == BAR
    assert Progress.mode_for("auto", io.StringIO()) == LOG
    assert Progress.mode_for("log", Terminal()) == LOG


def test_bar_shows_blobs_bytes_rate_and_eta() -> None:
    clock = Clock()
    progress = Progress(BAR, Terminal(), clock=clock)
    for _ in range(4):
        progress.found(25_000_000)
    progress.skipped(25_000_000)
    clock.now += 1
    progress.rate()  # a sample at t=1 with nothing moved yet
    progress.moved(10_000_000)
    clock.now += 1
    line = progress.bar_line(width=10)
    # 75 MB to move, 10 MB moved in the 2 s watched: 5 MB/s, 65 MB (13 s) to go.
    assert line == "[#.........] 1/4 blobs 10.0 MB/75.0 MB 5.0 MB/s ETA 0:13"


def test_bar_is_redrawn_in_place_and_events_print_above_it() -> None:
    clock = Clock()
    stream = Terminal()
    progress = Progress(BAR, stream, clock=clock)
    progress.found(1000)
    progress.copied("sha256:" + "a" * 64, 1000, 2)
    out = stream.getvalue()
    assert out.startswith("\r\x1b[K[")  # the bar, drawn on its own line
    assert "\r\x1b[Kcopied sha256:" + "a" * 64 + " (1.0 kB) to 2 buckets\n" in out
    assert out.endswith("[########################] 1/1 blobs 1.0 kB/1.0 kB 0 B/s ETA --:--")


def test_bar_redraws_at_most_ten_times_a_second() -> None:
    clock = Clock()
    stream = Terminal()
    progress = Progress(BAR, stream, clock=clock)
    progress.found(10**9)
    for _ in range(1000):
        progress.moved(1000)
    assert stream.getvalue().count("\r") == 1
    clock.now += 0.2
    progress.moved(1000)
    assert stream.getvalue().count("\r") == 2


def test_log_mode_writes_whole_lines_and_no_control_characters() -> None:
    stream = io.StringIO()
    progress = Progress(LOG, stream)
    progress.found(5)
    progress.moved(5)
    progress.copied("sha256:" + "b" * 64, 5, 1, in_flight=5)
    progress.failed("sha256:" + "c" * 64, "bytes hash to sha256:...")
    progress.unsupported("team/old:v1", "application/vnd.docker.distribution.manifest.v1+prettyjws")
    progress.image_mirrored("team/app:v1", 3)
    lines = stream.getvalue().splitlines()
    assert lines == [
        "copied sha256:" + "b" * 64 + " (5 B) to 1 bucket",
        "FAILED sha256:" + "c" * 64 + ": bytes hash to sha256:...",
        "not mirrored team/old:v1: unsupported manifest type "
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "finished image team/app:v1 (3 blobs)",
    ]
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_summary_counts_everything_and_decides_the_exit_status() -> None:
    clock = Clock()
    stream = io.StringIO()
    progress = Progress(LOG, stream, clock=clock)
    progress.found(2_000_000)
    progress.moved(2_000_000)
    progress.copied("sha256:" + "d" * 64, 2_000_000, 2, in_flight=2_000_000)
    progress.found(10)
    progress.skipped(10)
    progress.image_already_done()
    assert progress.tally.ok
    progress.failed("x", "y")
    assert not progress.tally.ok
    clock.now += 2
    line = progress.finish(source_requests=7)
    assert line == (
        "summary: copied 1 blobs (2.0 MB), skipped 1 (10 B), failed 1; images: 0 mirrored, "
        "1 already done, 0 unsupported, 0 failed; 7 source requests in 2.0 s (1.0 MB/s)"
    )
    assert stream.getvalue().endswith(line + "\n")


def test_a_failed_try_takes_its_bytes_back() -> None:
    progress = Progress(LOG, io.StringIO())
    progress.found(100)
    progress.moved(60)
    progress.moved(-60)
    assert progress.bytes_done() == 0


@pytest.mark.parametrize("count, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"),
                                         (1_234_567, "1.2 MB"), (5 * 10**12, "5000.0 GB")])
def test_human_bytes(count: int, text: str) -> None:
    assert human_bytes(count) == text


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (65.9, "1:05"), (3725, "1:02:05")])
def test_human_seconds(seconds: float, text: str) -> None:
    assert human_seconds(seconds) == text
