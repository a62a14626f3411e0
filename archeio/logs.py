"""Structured logging: one JSON object a line, as Google Cloud Logging reads it.

`severity` and `message` are the fields Cloud Logging maps; anything passed
as `extra={"fields": {...}}` is merged into the object, so event logs carry
their data as fields, not as text to parse.
"""

from __future__ import annotations

import json
import logging
import sys
import time


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
