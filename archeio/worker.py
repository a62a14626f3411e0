"""A worker process of `archeio serve --workers N`: `python -m archeio.worker NAME FD`.

Started by the supervisor (workers.py), never by hand. It reads its
settings from stdin (a length, then a pickle), serves the public port with
SO_REUSEPORT, writes a snapshot of its counters to file descriptor FD once
a second (one JSON object a line) and stops when it gets SIGTERM or when
its stdin ends (the supervisor is gone).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import sys

from iprange import RangeFileError

from . import signals
from .config import Settings
from .logs import setup_logging
from .metrics import Snapshot
from .server import Server
from .sockets import bind
from .workers import CONFIG_ERROR, SETTINGS_HEADER

log = logging.getLogger("archeio.workers")

# Snapshots not yet taken by a stalled supervisor beyond this are dropped,
# not buffered: the next one carries the same counters, newer.
_REPORT_BACKLOG = 1 << 20


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError("the supervisor closed our stdin before sending the settings")
        data += chunk
    return data


def read_settings(fd: int = 0) -> Settings:
    (size,) = SETTINGS_HEADER.unpack(_read_exactly(fd, SETTINGS_HEADER.size))
    settings = pickle.loads(_read_exactly(fd, size))
    assert isinstance(settings, Settings)
    return settings


class _SupervisorGone(asyncio.Protocol):
    """Our stdin, kept open by the supervisor: its end means the supervisor is gone."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.server.stopping.is_set():
            log.warning("supervisor is gone: stopping")
            self.server.stopping.set()


async def _run(server: Server, report_fd: int) -> None:
    loop = asyncio.get_running_loop()
    reports, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(report_fd, "wb", buffering=0))
    stdin, _ = await loop.connect_read_pipe(lambda: _SupervisorGone(server), os.fdopen(0, "rb", buffering=0))

    def report(snap: Snapshot) -> None:
        if not reports.is_closing() and reports.get_write_buffer_size() < _REPORT_BACKLOG:
            reports.write(json.dumps(snap).encode() + b"\n")

    server.report = report
    try:
        await server.run(bind(server.settings, reuse_port=True))
    finally:
        stdin.close()
        reports.close()


def main() -> None:
    # SIGHUP was ignored from the start (inherited); from here on SIGHUP and
    # SIGTERM are held until the loop handles them (server.py).
    signals.hold()
    name, report_fd = sys.argv[1], int(sys.argv[2])
    settings = read_settings()
    setup_logging(settings.log_level, settings.access_log > 0)
    server = Server(settings, worker=name, manage_gc=True)
    import uvloop

    try:
        uvloop.run(_run(server, report_fd))
    except (RangeFileError, OSError) as exc:
        log.error("worker %s cannot start: %s", name, exc)
        raise SystemExit(CONFIG_ERROR) from None


if __name__ == "__main__":
    main()
