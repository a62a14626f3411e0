"""Command lines whose reader goes away (`iprange lookup ... | head`) end quietly.

Python ignores SIGPIPE, so a write to a pipe nobody reads any more raises
BrokenPipeError: a traceback on stderr, and another one at exit when the
interpreter flushes what is still buffered. A C program would die of the
signal instead, silently, with status 141 (128 + SIGPIPE); `ended_by_reader`
gives the same outcome. It is only taken when standard output itself is
the broken pipe (its reader closed, which poll reports as an error on the
write end): a broken network connection still fails loudly.

Both command lines run their commands through `run_quietly` (iprange/cli.py,
archeio/cli.py; `archeio serve` imports it only once it holds its signals).
"""

from __future__ import annotations

import os
import select
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

Args = TypeVar("Args")

# The exit status of a process killed by SIGPIPE, as a shell reports it.
STATUS = 128 + signal.SIGPIPE


def stdout_reader_gone() -> bool:
    """Has standard output's reader closed it (a pipe or socket with nobody left to read)?"""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # no file descriptor, or not one poll can watch
        return False


def run_quietly(main: Callable[[Args], int], argv: Args) -> int:
    """`main(argv)`'s exit status; `ended_by_reader`'s if standard output's reader left."""
    try:
        try:
            return main(argv)
        finally:
            sys.stdout.flush()  # here, not at exit: a broken pipe is then caught below
    except BrokenPipeError as error:
        return ended_by_reader(error)


def ended_by_reader(error: BrokenPipeError) -> int:
    """The exit status after `error`, if it came from standard output's reader leaving; else re-raises it.

    Nothing more can reach the reader: standard output now points at
    /dev/null, so the interpreter's final flush does not fail again.
    """
    if not stdout_reader_gone():
        raise error
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)
    return STATUS
