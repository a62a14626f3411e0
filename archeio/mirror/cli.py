"""`archeio mirror`: its arguments, and turning them into a run.

Only argument handling and assembly live here (registry client, bucket
stores, copier, job, progress); `job` and `copier` do the work. Importing
this module is cheap: boto3 and aiohttp are loaded only when a run starts,
so `archeio serve` does not pay for them.

Exit status: 0 when everything asked for is in every bucket (or, with
--dry-run, could be), 1 when anything failed, 2 for a usage error or when
the `mirror` extra (boto3) is not installed: the server does not need it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .registry import ImageRef
    from .s3 import Bucket

DESCRIPTION = """\
Copy the config and layer blobs of images in an OCI registry into
S3-compatible buckets at containers/images/<digest>, where `archeio serve`
sends clients. Already present blobs are skipped; finished images are
recorded (archeio-mirror/done/<repo>@<digest>) so the next run skips them
without fetching their manifests. Credentials come from the standard AWS
chain (environment, ~/.aws, instance role).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `archeio mirror` arguments."""
    parser.description = DESCRIPTION
    parser.add_argument("images", nargs="*", metavar="REPO[:TAG|@DIGEST]",
                        help="repositories to mirror (every tag), or single tags or digests")
    parser.add_argument("--source", required=True, metavar="URL",
                        help="source registry, e.g. https://us-central1-docker.pkg.dev")
    parser.add_argument("--repositories-file", type=Path, metavar="FILE",
                        help="more REPO[:TAG|@DIGEST] entries, one a line; # starts a comment "
                        "(the list of repositories where the registry has no catalog)")
    parser.add_argument("--all-repositories", action="store_true",
                        help="mirror every repository of the registry's catalog (/v2/_catalog; "
                        "registry.k8s.io refuses it: list them in --repositories-file instead)")
    parser.add_argument("--to", action="append", default=[], metavar="URL",
                        help="a bucket's base URL as `archeio serve` uses it (repeatable); "
                        "http://host:port/bucket or https://bucket.s3.<region>.amazonaws.com")
    parser.add_argument("--mirrors-file", type=Path, metavar="FILE",
                        default=os.environ.get("ARCHEIO_MIRRORS_FILE") or None,
                        help="every base URL of this mirrors TOML [$ARCHEIO_MIRRORS_FILE]")
    parser.add_argument("--region", action="append", default=[], metavar="NAME",
                        help="only these regions of the mirrors file (repeatable)")
    parser.add_argument("--s3-endpoint", metavar="URL",
                        help="S3 API endpoint of an S3-compatible store (default: from the URL, or AWS)")
    parser.add_argument("--s3-region", metavar="NAME",
                        help="signing region where the URL does not name one (default: AWS chain)")
    parser.add_argument("--dry-run", action="store_true",
                        help="walk and compare, report what would be copied, write nothing")
    parser.add_argument("--rate", type=_positive_float, default=80.0, metavar="N",
                        help="requests a second to the source at most (default 80: under "
                        "Artifact Registry's 5,000 a minute)")
    parser.add_argument("--concurrency", type=_positive_int, default=8, metavar="N",
                        help="requests (and blob copies) in flight to the source at most (default 8)")
    parser.add_argument("--part-size", type=_part_size, default=8, metavar="MiB",
                        help="multipart part size in MiB, at least 5 (default 8); memory use is "
                        "about 2 parts per blob in flight")
    parser.add_argument("--retries", type=_positive_int, default=5, metavar="N",
                        help="tries per source request on 429, 5xx or a broken connection (default 5)")
    parser.add_argument("--acl", default="public-read", choices=("public-read", "none"),
                        help="canned ACL for blobs (default public-read; `none` for buckets "
                        "with ACLs disabled that grant reads by bucket policy)")
    parser.add_argument("--progress", default="auto", choices=("auto", "bar", "log"),
                        help="a live bar, log lines, or auto: a bar on a terminal (default)")


# What `pip install archeio` leaves out: boto3 serves only this command.
MIRROR_EXTRA = ("boto3", "botocore")


def run(args: argparse.Namespace) -> int:
    """Run `archeio mirror` with parsed arguments; returns the exit status."""
    missing = [name for name in MIRROR_EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        print(f"archeio mirror: needs {' and '.join(missing)}, which the server leaves out: "
              "pip install 'archeio[mirror]'", file=sys.stderr)
        return 2
    from .registry import parse_image_ref
    from .s3 import DestinationError

    try:
        refs = [parse_image_ref(text) for text in args.images]
        if args.repositories_file is not None:
            refs.extend(_listed(args.repositories_file))
        refs = list(dict.fromkeys(refs))  # each once, in the order given
        if not refs and not args.all_repositories:
            raise ValueError(
                "nothing to mirror: name repositories, --repositories-file or --all-repositories"
            )
        buckets = _destinations(args)
    except (OSError, ValueError, DestinationError) as exc:
        print(f"archeio mirror: {exc}", file=sys.stderr)
        return 2
    import asyncio

    try:
        return asyncio.run(_run(args, refs, buckets))
    except KeyboardInterrupt:
        # Uploads in progress were aborted on the way out; finished blobs
        # and done markers stay, so the next run resumes from here.
        print("archeio mirror: interrupted", file=sys.stderr)
        return 130


async def _run(args: argparse.Namespace, refs: list[ImageRef], buckets: list[Bucket]) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from .copier import BlobCopier
    from .job import MirrorJob
    from .progress import Progress
    from .ratelimit import Backoff, SourceLimits
    from .registry import RegistryClient
    from .s3 import BucketStore, make_clients

    stream = sys.stderr
    progress = Progress(Progress.mode_for(args.progress, stream), stream, dry_run=args.dry_run)
    threads = args.concurrency * len(buckets) + 4
    acl = None if args.acl == "none" else args.acl
    stores = [BucketStore(b, client, acl=acl) for b, client in zip(buckets, make_clients(buckets, threads),
                                                                   strict=True)]
    for store in stores:
        b = store.bucket
        progress.note(f"destination {b}: bucket {b.name} at {b.endpoint_url or 'AWS'}"
                      + (f" ({b.region})" if b.region else "") + (f", prefix {b.prefix}" if b.prefix else ""))
    limits = SourceLimits(args.rate, args.concurrency)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="s3") as executor:
        async with RegistryClient(args.source, limits, Backoff(attempts=args.retries)) as registry:
            copier = BlobCopier(registry, stores, executor, progress,
                                part_size=args.part_size * 1024 * 1024, dry_run=args.dry_run)
            job = MirrorJob(registry, stores, copier, progress, executor,
                            concurrency=args.concurrency, dry_run=args.dry_run)
            await job.run(refs, all_repositories=args.all_repositories)
        progress.finish(registry.requests)
    return 0 if progress.tally.ok else 1


def _destinations(args: argparse.Namespace) -> list[Bucket]:
    """The buckets: --to URLs, then the mirrors file's, each URL once."""
    from ..config import parse_mirrors
    from .s3 import bucket_from_url

    regions: dict[str, str | None] = {url.rstrip("/"): None for url in args.to}
    if args.mirrors_file is not None:
        mirrors = parse_mirrors(Path(args.mirrors_file).read_text())
        wanted = set(args.region)
        found = set()
        for cloud, by_region in mirrors.by_cloud.items():
            for region, url in by_region.items():
                if wanted and region not in wanted:
                    continue
                found.add(region)
                # AWS region names can sign requests; other clouds' cannot.
                regions.setdefault(url, region if cloud == "AWS" else None)
        if wanted - found:
            raise ValueError(f"--region {', '.join(sorted(wanted - found))}: not in {args.mirrors_file}")
    elif args.region:
        raise ValueError("--region needs --mirrors-file (or ARCHEIO_MIRRORS_FILE)")
    if not regions:
        raise ValueError("no destination: give --to URL or --mirrors-file (or set ARCHEIO_MIRRORS_FILE)")
    return [
        bucket_from_url(url, args.s3_endpoint, args.s3_region or region) for url, region in regions.items()
    ]


def _listed(path: Path) -> list[ImageRef]:
    """The entries of a --repositories-file: one a line, `#` to the line's end a comment.

    Blank lines and surrounding spaces are ignored; a bad entry is a usage
    error naming its line.
    """
    from .registry import parse_image_ref

    refs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                refs.append(parse_image_ref(text))
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
    return refs


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return number


def _part_size(value: str) -> int:
    number = int(value)
    if number < 5:
        raise argparse.ArgumentTypeError("must be at least 5 (MiB; S3's smallest part)")
    return number
