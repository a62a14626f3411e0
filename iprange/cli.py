"""The `iprange` command line: look addresses up in the data the server would load.

`iprange lookup IP...` prints `<address>\t<cloud>\t<region>` a line (`-`
for both when the address is in no provider's range), or JSON lines with
`--json`. An unparseable address prints an error line; the exit status is
then 2. `iprange info` prints each provider's prefix count and data date.
`iprange update --dest DIR` downloads the providers' feeds into DIR
(validated, atomically; see update.py): exit status 1 if any feed failed,
its old file then kept. `iprange export --dest DIR [CLOUD...]` writes the
embedded data as the providers' files, for a directory without internet
access (see export.py for why their serials are the lowest possible).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .export import CLOUDS, export
from .index import InvalidAddress
from .load import describe, load_index
from .parse import AWS, AZURE, GCP, RangeFileError
from .pipes import run_quietly
from .update import DEFAULT_URLS, update


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
    updater = commands.add_parser(
        "update", help="download the AWS and Google Cloud feeds (Azure by flag) into a directory",
    )
    updater.add_argument(
        "--dest", type=Path, default=os.environ.get("ARCHEIO_RANGES_DIR") or None,
        help="directory to write (default: $ARCHEIO_RANGES_DIR)",
    )
    updater.add_argument("--aws-url", default=DEFAULT_URLS[AWS], help="AWS ip-ranges.json feed")
    updater.add_argument("--gcp-url", default=DEFAULT_URLS[GCP], help="Google Cloud cloud.json feed")
    updater.add_argument(
        "--azure-url", default=None,
        help="Azure Service Tags JSON (published at a new address every week; no default)",
    )
    updater.add_argument("--timeout", type=float, default=30.0, help="seconds per download")
    updater.add_argument(
        "--max-loss", type=float, default=0.2,
        help="refuse a feed with fewer than (1 - this share) of the prefixes already there",
    )
    exporter = commands.add_parser(
        "export", help="write the embedded data as the providers' files (only files not already there)",
    )
    exporter.add_argument("--dest", type=Path, required=True, help="directory to write")
    exporter.add_argument("clouds", nargs="*", metavar="CLOUD", help=f"{', '.join(CLOUDS)} (default: all three)")
    return parser


def _update(args: argparse.Namespace) -> int:
    if args.dest is None:
        print("iprange update: --dest DIR is required (or set ARCHEIO_RANGES_DIR)", file=sys.stderr)
        return 2
    if not args.dest.is_dir():
        print(f"iprange update: {args.dest}: no such directory", file=sys.stderr)
        return 2
    urls = {AWS: args.aws_url, GCP: args.gcp_url}
    if args.azure_url:
        urls[AZURE] = args.azure_url
    status = 0
    for result in update(args.dest, urls, args.timeout, args.max_loss):
        if result.ok:
            print(f"{result.cloud}: {result.message}")
        else:
            print(f"iprange update: {result.cloud}: {result.message}", file=sys.stderr)
            status = 1
    return status


def _export(args: argparse.Namespace) -> int:
    unknown = [cloud for cloud in args.clouds if cloud not in CLOUDS]
    if unknown:
        print(f"iprange export: unknown cloud {unknown[0]!r} (known: {', '.join(CLOUDS)})", file=sys.stderr)
        return 2
    if not args.dest.is_dir():
        print(f"iprange export: {args.dest}: no such directory", file=sys.stderr)
        return 2
    try:
        done = export(args.dest, args.clouds or CLOUDS)
    except (RangeFileError, OSError) as exc:
        print(f"iprange export: {exc}", file=sys.stderr)
        return 1
    for result in done:
        print(f"{result.cloud}: {result.message}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; a reader that leaves (`iprange lookup ... | head`) ends it quietly (pipes.py)."""
    return run_quietly(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "update":
        return _update(args)
    if args.command == "export":
        return _export(args)
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
