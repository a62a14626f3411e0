"""Cloud provider IP ranges: parsing the published files into a prefix index.

This package knows nothing of HTTP or of the redirect server; it answers
"which cloud and region is this address in".
"""

from .index import CloudIndex, InvalidAddress, Placement
from .load import describe, load_index
from .parse import AWS, AZURE, GCP, ProviderRanges, RangeFileError

__all__ = [
    "AWS",
    "AZURE",
    "GCP",
    "CloudIndex",
    "InvalidAddress",
    "Placement",
    "ProviderRanges",
    "RangeFileError",
    "describe",
    "load_index",
]
