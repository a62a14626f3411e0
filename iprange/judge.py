"""Judging a provider's new range file against the data it would replace.

Shared by `iprange update` (before it replaces a file) and the server's
reload (before it swaps its index): pure checks, no network, so the server
imports them without the downloader's HTTP machinery.
"""

from __future__ import annotations

from .parse import ProviderRanges, RangeFileError

# Outcomes of comparing a candidate feed with the data it would replace.
NEWER = "newer"
SAME = "unchanged"
OLDER = "older"
LOSS = "loss"


def distinct_prefixes(provider: ProviderRanges) -> int:
    return len({prefix for prefix, _ in provider.prefixes})


def compare(loaded: ProviderRanges, candidate: ProviderRanges, max_loss: float) -> tuple[str, str]:
    """Is `candidate` an acceptable successor of `loaded`? (outcome, reason)."""
    if candidate.serial < loaded.serial:
        return OLDER, f"serial {candidate.serial} is older than {loaded.serial}"
    if candidate.serial == loaded.serial:
        return SAME, f"serial {candidate.serial} already there"
    before, after = distinct_prefixes(loaded), distinct_prefixes(candidate)
    if after < before * (1 - max_loss):
        return LOSS, f"{after} prefixes instead of {before}: loses more than {max_loss:.0%}"
    return NEWER, f"serial {loaded.serial} -> {candidate.serial}, {after} prefixes"


def check_prefixes(provider: ProviderRanges) -> None:
    """RangeFileError unless every prefix is a valid network (the radix tree
    silently clamps `/99` to `/32`, so it cannot be the judge)."""
    import ipaddress

    for prefix, region in provider.prefixes:
        try:
            ipaddress.ip_network(prefix, strict=False)
        except ValueError:
            raise RangeFileError(f"{provider.cloud}: bad prefix {prefix!r} (region {region!r})") from None
