"""Which address is the client's: the trust model of X-Forwarded-For.

Behind Google's external load balancer the header arrives as
`<anything the client sent>, <client>, <load balancer>`: the load balancer
appends the address it saw and its own. Only the entries appended by
proxies we trust can be believed, so the client is the entry just before
the last `trusted_hops` ones (default 1: the second-to-last), never the
first (which the client can forge). Fewer entries than that means the
request did not come through the proxies we expect: 400, as upstream.

With no header (or an empty one), the peer address of the connection is
the client: a direct connection, as in development.
"""

from __future__ import annotations


def forwarded_entries(forwarded: str) -> list[str]:
    """The entries of an X-Forwarded-For value, split on commas, spaces and tabs.

    Only those: HTTP's optional whitespace is space and tab. `str.split()`
    would also split on characters such as U+00A0, which a client can put in
    the header to hide an entry from us that an HTTP parser keeps.
    """
    return [entry for entry in forwarded.replace(",", " ").replace("\t", " ").split(" ") if entry]


def client_entry(entries: list[str], trusted_hops: int) -> int | None:
    """Which entry is the client's: the one before the trusted proxies' own; None if too few."""
    if len(entries) <= trusted_hops:
        return None
    return len(entries) - 1 - trusted_hops


def client_ip(forwarded: str | None, peer: str | None, trusted_hops: int) -> str | None:
    """The client's address as a string, or None if it cannot be determined.

    The returned string is not validated here (the range index refuses what
    is not an address). `archeio explain` uses the same two pieces to say
    which entry was taken.
    """
    if forwarded:
        entries = forwarded_entries(forwarded)
        if entries:
            index = client_entry(entries, trusted_hops)
            return None if index is None else entries[index]
    return peer


def strip_port(address: str) -> str:
    """`[v6]:port`, `[v6]` or `v4:port` -> the bare address (other input unchanged).

    Some proxies write ports or brackets into X-Forwarded-For; this is the
    slow path, tried only when an entry is not a bare address.
    """
    if address.startswith("["):
        end = address.find("]")
        return address[1:end] if end > 0 else address
    if address.count(":") == 1:
        return address.split(":", 1)[0]
    return address
