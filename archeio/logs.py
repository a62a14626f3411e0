"""Structured logging: one JSON object a line, as Google Cloud Logging reads it.

`severity` and `message` are the fields Cloud Logging maps; anything passed
as `extra={"fields": {...}}` is merged into the object, so event logs carry
their data as fields, not as text to parse.

Access lines (`AccessLine`) are shaped for Cloud Logging's `httpRequest`
and trace fields. The HTTP engine samples the requests to log and gives
the request flow their `RequestFacts`; the flow fills a line (app.py), and
the engine completes it with what only it knows, the bytes it sent and
when, and writes it.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import NamedTuple

access_log = logging.getLogger("archeio.access")

# The largest span id X-Cloud-Trace-Context may carry: an unsigned 64-bit number.
_SPAN_LIMIT = 1 << 64


class RequestFacts(NamedTuple):
    """What an access line reads of the request beyond the flow's own inputs.

    The engines sample the requests to log (a share ARCHEIO_ACCESS_LOG) and
    give these only for those: the flow writes a line for a request with
    facts. Headers come as raw bytes, read as latin-1 characters here, so
    that both engines write the same line for the same bytes.
    """

    trace: bytes | None  # X-Cloud-Trace-Context
    agent: bytes | None  # User-Agent
    protocol: str  # "HTTP/1.1"


def span_id(trace: bytes) -> str | None:
    """The span of `TRACE_ID/SPAN_ID;o=OPTIONS` as Cloud Logging wants it: 16 hex digits; None if unusable.

    The header's span id is the decimal form of an unsigned 64-bit number;
    anything else (no span, not decimal digits, too large, or 0, which W3C
    trace context calls invalid) gives no span rather than a wrong one.
    """
    _, slash, rest = trace.partition(b"/")
    digits = rest.split(b";", 1)[0]
    if not slash or not digits.isdigit() or len(digits) > 20:
        return None
    value = int(digits)
    if not 0 < value < _SPAN_LIMIT:
        return None
    return f"{value:016x}"


def _text(raw: bytes) -> str:
    return raw.decode("latin-1")


class AccessLine:
    """One sampled request's access line, waiting for the engine's part: written by `emit`."""

    __slots__ = ("method", "url", "status", "fields")

    def __init__(
        self, method: str, url: str, status: int, remote: str | None, facts: RequestFacts | None,
        fields: dict[str, object], trace_project: str,
    ) -> None:
        self.method, self.url, self.status = method, url, status
        request: dict[str, object] = {"requestMethod": method, "requestUrl": url, "status": status,
                                      "responseSize": None}
        if facts is not None and facts.agent is not None:
            request["userAgent"] = _text(facts.agent)
        request["remoteIp"] = remote
        request["latency"] = None
        if facts is not None:
            request["protocol"] = facts.protocol
        self.fields: dict[str, object] = {"httpRequest": request, **fields}
        if facts is not None and facts.trace:
            trace_id = _text(facts.trace.split(b"/", 1)[0])
            self.fields["trace"] = trace_id
            if trace_project:
                self.fields["logging.googleapis.com/trace"] = f"projects/{trace_project}/traces/{trace_id}"
            span = span_id(facts.trace)
            if span is not None:
                self.fields["logging.googleapis.com/spanId"] = span

    def emit(self, size: int, seconds: float) -> None:
        """Write the line: `size` bytes were sent (status line, headers and body), `seconds` after the request."""
        request = self.fields["httpRequest"]
        assert isinstance(request, dict)
        # Cloud Logging's HttpRequest.responseSize is an int64, written as a decimal string in JSON.
        request["responseSize"] = str(size)
        request["latency"] = f"{seconds:.6f}s"
        access_log.info("%s %s %s", self.method, self.url, self.status, extra={"fields": self.fields})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "severity": record.levelname if record.levelname != "WARNING" else "WARNING",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str, access_log: bool = False) -> None:
    """JSON lines on stderr at `level`; replaces any earlier handlers.

    Access lines are INFO records: when they are turned on they are kept
    whatever `level` says, so `ARCHEIO_LOG_LEVEL=warning` with access logs
    on means access lines and warnings, nothing else.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("archeio.access").setLevel(logging.INFO if access_log else logging.NOTSET)
