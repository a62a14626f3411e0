"""The Host header rule of both engines (RFC 9112 3.2, RFC 3986 3.2.2).

A server MUST answer 400 to an HTTP/1.1 request that lacks a Host header,
that has more than one Host line, or whose Host value is invalid; Go's
net/http, which upstream runs, does. HTTP/1.0 may omit it. A valid value is
RFC 3986's `host [ ":" port ]`, where host is a bracketed IP literal (an
IPv6 address or an IPvFuture), an IPv4 address or a reg-name (IPv4 is a
reg-name by its characters, so one pattern covers both), and may be empty
(the authority of an absolute-form or asterisk-form target may be).

A deployment sees few distinct Host values (its own names), so answers are
remembered for values up to `REMEMBERED_LENGTH` bytes, at most
`REMEMBERED` of them (the tables are emptied when full): the pattern runs
once per value, not per request, and a flood of distinct values holds at
most about 128 KiB here.
"""

from __future__ import annotations

import re

REMEMBERED = 256
REMEMBERED_LENGTH = 255

_REG_NAME = rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*"
_IP_FUTURE = rb"v[0-9A-Fa-f]+\.[A-Za-z0-9\-._~!$&'()*+,;=:]+"
_HOST_RE = re.compile(rb"(?:\[(?P<literal>[^\]]*)\]|" + _REG_NAME + rb")(?::[0-9]*)?")
_IP_FUTURE_RE = re.compile(_IP_FUTURE)

# Value -> its verdict, and the good values alone: an engine may look a
# value up in GOOD inline (one set lookup) before calling `valid_host`.
KNOWN: dict[bytes | str, bool] = {}
GOOD: set[bytes | str] = set()


def _valid(value: bytes) -> bool:
    # A field value excludes the whitespace around it (RFC 9110 5.5); llhttp
    # hands over trailing whitespace, aiohttp strips it.
    match = _HOST_RE.fullmatch(value.strip(b" \t"))
    if match is None:
        return False
    literal = match["literal"]
    if literal is None:
        return True
    if _IP_FUTURE_RE.fullmatch(literal):
        return True
    try:
        import ipaddress  # only for a bracketed IPv6 literal

        ipaddress.IPv6Address(literal.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return False
    return "%" not in literal.decode("ascii")  # a zone id is not allowed in a URI's IP literal


def valid_host(value: bytes | str) -> bool:
    """Is `value` (the Host field value: its bytes, or text as aiohttp decodes them) `host [":" port]`?"""
    known = KNOWN.get(value)
    if known is not None:
        return known
    answer = _valid(value if type(value) is bytes else value.encode("utf-8", "surrogateescape"))  # type: ignore[union-attr]
    if len(value) <= REMEMBERED_LENGTH:
        if len(KNOWN) >= REMEMBERED:
            KNOWN.clear()
            GOOD.clear()
        KNOWN[value] = answer
        if answer:
            GOOD.add(value)
    return answer
