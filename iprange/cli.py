"""The `iprange` command line: look addresses up in the data the server would load.

`iprange lookup IP...` prints `<address>\t<cloud>\t<region>` a line (`-`
for both when the address is in no provider's range), or JSON lines with
`--json`. An unparseable address prints an error line; the exit status is
then 2. `iprange info` prints each provider's prefix count and data date.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .index import InvalidAddress
from .load import describe, load_index
from .parse import RangeFileError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iprange", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--ranges-dir", default=os.environ.get("ARCHEIO_RANGES_DIR") or None,
        help="directory of provider range files (default: $ARCHEIO_RANGES_DIR, else embedded)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    lookup = commands.add_parser("lookup", help="print cloud and region of addresses")
    lookup.add_argument("addresses", nargs="+", metavar="IP")
    lookup.add_argument("--json", action="store_true", help="print JSON lines")
    commands.add_parser("info", help="print prefix counts and data dates")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        index = load_index(Path(args.ranges_dir) if args.ranges_dir else None)
    except RangeFileError as exc:
        print(f"iprange: {exc}", file=sys.stderr)
        return 2
    if args.command == "info":
        print(describe(index))
        return 0
    status = 0
    for address in args.addresses:
        try:
            placement = index.lookup(address)
        except InvalidAddress:
            print(f"iprange: not an IP address: {address!r}", file=sys.stderr)
            status = 2
            continue
        cloud, region = placement if placement else (None, None)
        if args.json:
            print(json.dumps({"address": address, "cloud": cloud, "region": region}))
        else:
            print(f"{address}\t{cloud or '-'}\t{region or '-'}")
    return status
