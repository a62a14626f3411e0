"""Longest-prefix index from IP address to (cloud, region).

Two radix trees (pytricia), one per address family: pytricia does not key
IPv4 and IPv6 safely in one tree, nor does it read an IPv4-mapped IPv6
address (::ffff:a.b.c.d) as the IPv4 address it is. A mapped address as a
dual-stack socket reports it (`::ffff:` and the dotted address) is looked
up in the IPv4 tree by its IPv4 part, at the cost of one string test; any
other spelling of one is recognised after the IPv6 tree finds nothing
(the clouds publish no prefix under ::ffff:0:0/96) and parsed off the hot
path. (The IPv6 tree used to hold every IPv4 prefix in its mapped form as
well: 6 ms of every start and 2 MB.) Values are shared `Placement` tuples, one
object per (cloud, region), so the index holds no per-prefix garbage and
callers may use a placement as a dictionary key.

An index is immutable once built: a reload builds a new one and swaps the
reference, so a request never sees a half-built index.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import NamedTuple

import pytricia

from .parse import CompiledPrefixes, ProviderRanges, RangeFileError


class Placement(NamedTuple):
    """Where an address lives: the cloud's name and its region (or scope)."""

    cloud: str
    region: str



class InvalidAddress(ValueError):
    """The string is not an IP address."""


class CloudIndex:
    """Answers "which cloud and region is this address in", most specific prefix first."""

    def __init__(self, providers: Iterable[ProviderRanges]) -> None:
        self._v4 = pytricia.PyTricia(32, socket.AF_INET)
        self._v6 = pytricia.PyTricia(128, socket.AF_INET6)
        self._v4_get = self._v4.get
        self._v6_get = self._v6.get
        placements: dict[tuple[str, str], Placement] = {}
        self.providers: dict[str, ProviderRanges] = {}
        self.prefix_counts: dict[str, int] = {}
        for provider in providers:
            self.providers[provider.cloud] = provider
            if provider.checked:
                self.prefix_counts[provider.cloud] = self._add_checked(provider, placements)
                continue
            count = 0
            for prefix, region in provider.prefixes:
                key = (provider.cloud, region)
                placement = placements.get(key)
                if placement is None:
                    placement = placements[key] = Placement(*key)
                is_v6 = ":" in prefix
                # pytricia clamps an impossible length (/99 becomes /32) and
                # raises SystemError for some bad addresses: check first.
                address, slash, length = prefix.partition("/")
                if not slash or not length.isdigit() or int(length) > (128 if is_v6 else 32):
                    raise RangeFileError(f"{provider.cloud}: bad prefix {prefix!r}")
                tree = self._v6 if is_v6 else self._v4
                try:
                    # A prefix listed twice (AWS repeats ranges per service)
                    # keeps its first region; they agree in the published data.
                    if not tree.has_key(prefix):
                        tree[prefix] = placement
                        count += 1
                except (ValueError, KeyError, SystemError) as exc:
                    raise RangeFileError(f"{provider.cloud}: bad prefix {prefix!r}") from exc
            self.prefix_counts[provider.cloud] = count

    def _add_checked(self, provider: ProviderRanges, placements: dict[tuple[str, str], Placement]) -> int:
        """Insert the compiled embedded data's prefixes: already checked, listed once, grouped by region."""
        prefixes = provider.prefixes
        assert isinstance(prefixes, CompiledPrefixes)
        v4, v6 = self._v4, self._v6
        for region, (in_v4, in_v6) in prefixes.regions.items():
            key = (provider.cloud, region)
            placement = placements.get(key)
            if placement is None:
                placement = placements[key] = Placement(*key)
            for prefix in in_v4.split():
                v4[prefix] = placement
            for prefix in in_v6.split():
                v6[prefix] = placement
        return len(prefixes)

    def __len__(self) -> int:
        return sum(self.prefix_counts.values())

    def lookup(self, address: str) -> Placement | None:
        """The placement of the most specific prefix holding `address`, or None.

        Raises `InvalidAddress` for anything that is not an IPv4 or IPv6
        address (a prefix such as `1.2.3.4/8` included).
        """
        try:
            if ":" not in address:
                if "/" not in address:
                    return self._v4_get(address)  # type: ignore[no-any-return]
            elif "/" not in address and "%" not in address:
                if address.startswith("::ffff:") and "." in address:
                    # An IPv4 peer of a dual-stack socket: its IPv4 address.
                    return self._v4_get(address[7:])  # type: ignore[no-any-return]
                found = self._v6_get(address)
                # No cloud publishes a prefix under ::ffff:0:0/96: only another
                # spelling of a mapped address needs the slow path's parse.
                if found is not None or "ffff" not in address.lower():
                    return found  # type: ignore[no-any-return]
        except ValueError:
            pass
        return self._lookup_unusual(address)

    def _lookup_unusual(self, address: str) -> Placement | None:
        # Off the hot path: strings the trees refuse. A zone id
        # (fe80::1%eth0) names an interface, not a different address.
        import ipaddress

        try:
            parsed = ipaddress.ip_address(address.split("%", 1)[0] if ":" in address else address)
        except ValueError:
            raise InvalidAddress(f"not an IP address: {address!r}") from None
        if isinstance(parsed, ipaddress.IPv6Address):
            if parsed.ipv4_mapped is not None:
                return self._v4.get(str(parsed.ipv4_mapped))  # type: ignore[no-any-return]
            return self._v6.get(str(parsed))  # type: ignore[no-any-return]
        return self._v4.get(str(parsed))  # type: ignore[no-any-return]

    def lookup_prefix(self, address: str) -> tuple[str, Placement] | None:
        """The most specific prefix holding `address`, with its placement; None if none.

        For explaining a decision (`archeio explain`), off the hot path: it
        accepts what `lookup` accepts (IPv4-mapped IPv6 is looked up as
        IPv4, a zone id is ignored) and raises `InvalidAddress` likewise.
        """
        import ipaddress

        try:
            parsed = ipaddress.ip_address(address.split("%", 1)[0] if ":" in address else address)
        except ValueError:
            raise InvalidAddress(f"not an IP address: {address!r}") from None
        if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
            parsed = parsed.ipv4_mapped
        tree = self._v6 if isinstance(parsed, ipaddress.IPv6Address) else self._v4
        prefix = tree.get_key(str(parsed))
        if prefix is None:
            return None
        return prefix, tree[prefix]
