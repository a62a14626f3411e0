"""The HTTP engines every request-handling test runs against.

Request-handling test modules say `pytestmark = pytest.mark.usefixtures("engine")`
(the `engine` fixture is in conftest.py): each of their tests then runs once
per engine, and every server the test support starts in that time, in
process or as `archeio serve`, uses that engine unless a test sets
`ARCHEIO_HTTP` itself. The fixture is module-scoped, so module-scoped
servers are parametrized too and each module runs whole on one engine,
then whole on the other.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from archeio.http import ENGINES as _ENGINES

ENGINES: tuple[str, ...] = tuple(_ENGINES)
_current = ["httptools"]


def current() -> str:
    """The engine of the test running now (the default engine outside parametrized modules)."""
    return _current[0]


def select(name: str) -> str:
    """Make `name` the current engine; returns the previous one."""
    previous, _current[0] = _current[0], name
    return previous


# -- where the engines legitimately differ ------------------------------------------
# Each difference has a name; docs/request-handling.md ("Where the engines
# differ") explains each one, and the differential test
# (test_engine_differential.py) accepts exactly these.

# aiohttp refuses what the lean engine refuses with 414 or 431 with a 400.
_AIOHTTP_REFUSALS = {414: 400, 431: 400}


def refusal(status: int) -> int:
    """The status the current engine gives where the lean engine gives `status`."""
    if current() == "aiohttp":
        return _AIOHTTP_REFUSALS.get(status, status)
    return status


def status_line() -> re.Pattern[bytes]:
    """The status lines the current engine may send.

    The lean engine always says HTTP/1.1. aiohttp answers with the request's
    own version: HTTP/1.0 for an HTTP/1.0 request and for its refusals of
    requests it could not parse, HTTP/0.9 for a request line without one
    (named difference "status-line-version").
    """
    if current() == "aiohttp":
        return re.compile(rb"HTTP/(?:1\.[01]|0\.9) (\d{3}) [^\x00-\x1f]*")
    return re.compile(rb"HTTP/1\.1 (\d{3}) [^\x00-\x1f]*")


@contextlib.contextmanager
def using(name: str) -> Iterator[str]:
    """The current engine is `name` inside the block (for tests that talk to both)."""
    previous = select(name)
    try:
        yield name
    finally:
        select(previous)
