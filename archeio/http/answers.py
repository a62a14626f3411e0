"""What both engines write themselves: reason phrases and the error answers of the wire.

The phrases are RFC 9110's, for the statuses we send; another status takes
Python's `http.HTTPStatus` phrase, imported only then (its enum is a
noticeable share of a start). `http_date` writes the Date header's
IMF-fixdate (RFC 9110 5.6.7) without `email.utils`, for the same reason.

The error answers are those of the HTTP layer, before or beside the request
flow: a request that cannot be parsed or is over a limit, and an unexpected
exception (a bug) while answering, which both engines log, count and answer
with the same 503.
"""

from __future__ import annotations

import time

from ..routing import LocalAnswer, oci_error

_PHRASES = {
    200: "OK", 307: "Temporary Redirect", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    413: "Content Too Large", 414: "URI Too Long", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable",
}
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

ERRORS: dict[int, LocalAnswer] = {
    400: oci_error(400, "UNSUPPORTED", "malformed HTTP request"),
    413: oci_error(413, "UNSUPPORTED", "request body and trailers too large"),
    414: oci_error(414, "UNSUPPORTED", "request target too long"),
    431: oci_error(431, "UNSUPPORTED", "request headers too large"),
}
UNAVAILABLE = oci_error(503, "UNAVAILABLE", "internal error, try again")


def reason(status: int) -> str:
    """The reason phrase for `status` ("Unknown" for a code no RFC names)."""
    phrase = _PHRASES.get(status)
    if phrase is not None:
        return phrase
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def http_date(when: float | None = None) -> str:
    """`when` (default: now) as an HTTP date: `Sun, 06 Nov 1994 08:49:37 GMT`."""
    t = time.gmtime(when)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")
