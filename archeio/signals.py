"""Signals that arrive before a process can act on them are held, not fatal.

A SIGHUP (range reload) or SIGTERM can arrive at any moment: while the
interpreter imports, while workers start, while the loop shuts down.
Python's default for SIGHUP and SIGTERM is to die. `hold` replaces that, as
early as a process can, with a handler that only records the signal; once
the event loop installs its real handlers, `take` says whether one came in
meanwhile, so it is acted on then (a reload done late, a stop begun late)
rather than lost or fatal.

Worker processes are started with SIGHUP ignored (workers.py), which an
exec keeps, so even the interpreter's own start-up cannot be killed by one.
"""

from __future__ import annotations

import signal
from types import FrameType

HELD = (signal.SIGHUP, signal.SIGTERM)
_arrived: set[int] = set()


def _record(signum: int, frame: FrameType | None) -> None:
    _arrived.add(signum)


def hold(signals: tuple[int, ...] = HELD) -> None:
    """From now on these signals are recorded, not acted on."""
    for sig in signals:
        signal.signal(sig, _record)


def take(sig: int) -> bool:
    """Did `sig` arrive while held? Forgets it."""
    if sig in _arrived:
        _arrived.discard(sig)
        return True
    return False
