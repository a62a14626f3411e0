"""What both engines write themselves: reason phrases and the error answers of the wire.

Python's `http.HTTPStatus` still carries RFC 7231's phrases for a few codes;
RFC 9110 renamed them, and its names are the ones written here (the public
port and the admin port alike).

The error answers are those of the HTTP layer, before or beside the request
flow: a request that cannot be parsed or is over a limit, and an unexpected
exception (a bug) while answering, which both engines log, count and answer
with the same 503.
"""

from __future__ import annotations

from http import HTTPStatus

from ..routing import LocalAnswer, oci_error

_RFC_9110 = {413: "Content Too Large", 414: "URI Too Long", 422: "Unprocessable Content"}

ERRORS: dict[int, LocalAnswer] = {
    400: oci_error(400, "UNSUPPORTED", "malformed HTTP request"),
    413: oci_error(413, "UNSUPPORTED", "request body and trailers too large"),
    414: oci_error(414, "UNSUPPORTED", "request target too long"),
    431: oci_error(431, "UNSUPPORTED", "request headers too large"),
}
UNAVAILABLE = oci_error(503, "UNAVAILABLE", "internal error, try again")


def reason(status: int) -> str:
    """The reason phrase for `status` ("Unknown" for a code no RFC names)."""
    try:
        return _RFC_9110.get(status) or HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
