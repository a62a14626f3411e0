#!/usr/bin/env python3
"""Render one Cloud Run service manifest per region of regions.toml.

    python3 deploy/cloudrun/render.py
        re-render the committed files, deploy/cloudrun/services/<region>.yaml,
        with the image and project left as placeholders (IMAGE@sha256:DIGEST,
        PROJECT); run it after editing regions.toml or service.template.yaml
    python3 deploy/cloudrun/render.py --image REGISTRY/archeio@sha256:<64 hex> --project PROJECT --out DIR
        the files to deploy, into DIR; then, per region,
        gcloud run services replace DIR/<region>.yaml

The manifest is service.template.yaml with `${name}` filled in (Python's
string.Template): the region and its two values from the table, the path
all regions share, the image and the project. Standard library only, so it
runs with any Python 3.11 and nothing installed. A bad table, an image not
named by digest or a bad project id exits 2 with one line saying what.
"""

from __future__ import annotations

import argparse
import re
import string
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REGIONS = HERE / "regions.toml"
TEMPLATE = HERE / "service.template.yaml"
COMMITTED = HERE / "services"
# What the committed files carry instead of an image and a project.
PLACEHOLDER_IMAGE = "IMAGE@sha256:DIGEST"
PLACEHOLDER_PROJECT = "PROJECT"
REGION_KEYS = {"upstream", "default_mirror"}
# Cloud Run region names: us-central1, europe-west10, ...
_REGION = re.compile(r"[a-z]+-[a-z]+[0-9]+")
# An image by digest: [registry[:port]/]path@sha256:<64 lowercase hex>.
_IMAGE_BY_DIGEST = re.compile(r"[a-z0-9][a-z0-9._\-/:]*@sha256:[0-9a-f]{64}")
# Google Cloud project ids: 6 to 30 lowercase letters, digits and hyphens, starting with a letter.
_PROJECT = re.compile(r"[a-z][a-z0-9\-]{4,28}[a-z0-9]")
_HTTPS = re.compile(r"https://[^\s/]+")


class TableError(ValueError):
    """regions.toml (or an argument) is not what the format at its top says."""


def load_regions(text: str) -> tuple[str, dict[str, dict[str, str]]]:
    """(upstream path, region -> {upstream, default_mirror}) of a regions.toml text."""
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TableError(f"regions.toml: {exc}") from None
    if set(table) != {"upstream_path", "regions"}:
        raise TableError(f"regions.toml: top-level keys must be upstream_path and regions, not {sorted(table)}")
    path, regions = table["upstream_path"], table["regions"]
    if not isinstance(path, str) or not path or path.startswith("/"):
        raise TableError("regions.toml: upstream_path must be a relative path such as k8s-artifacts-prod/images")
    if not regions:
        raise TableError("regions.toml: no region")
    for region, entry in regions.items():
        if not _REGION.fullmatch(region):
            raise TableError(f"regions.toml: {region!r} is not a Cloud Run region name")
        if not isinstance(entry, dict) or set(entry) != REGION_KEYS:
            raise TableError(f"regions.toml: [regions.{region}] must have exactly {sorted(REGION_KEYS)}")
        for key, value in entry.items():
            if not isinstance(value, str) or not _HTTPS.fullmatch(value):
                raise TableError(f"regions.toml: [regions.{region}] {key} must be https://<host>, not {value!r}")
    return path, regions


def render(template: str, upstream_path: str, regions: dict[str, dict[str, str]],
           image: str, project: str) -> dict[str, str]:
    """File name -> manifest text, one per region."""
    fill = string.Template(template)
    return {
        f"{region}.yaml": fill.substitute(
            region=region, upstream=entry["upstream"], default_mirror=entry["default_mirror"],
            upstream_path=upstream_path, image=image, project=project,
            placeholder_image=PLACEHOLDER_IMAGE, placeholder_project=PLACEHOLDER_PROJECT,
        )
        for region, entry in regions.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/cloudrun/render.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", help="the image by digest: REGISTRY/archeio@sha256:<64 hex>")
    parser.add_argument("--project", help="the Google Cloud project id (for ARCHEIO_TRACE_PROJECT)")
    parser.add_argument("--out", type=Path, help="directory to write into (required with --image/--project)")
    args = parser.parse_args(argv)
    try:
        if (args.image or args.project) and not (args.image and args.project and args.out):
            raise TableError("--image, --project and --out go together (the committed files keep the placeholders)")
        if args.image and not _IMAGE_BY_DIGEST.fullmatch(args.image):
            raise TableError(f"--image must name the image by digest (NAME@sha256:<64 hex>), not {args.image!r}")
        if args.project and not _PROJECT.fullmatch(args.project):
            raise TableError(f"--project {args.project!r} is not a Google Cloud project id")
        upstream_path, regions = load_regions(REGIONS.read_text())
    except TableError as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 2
    files = render(TEMPLATE.read_text(), upstream_path, regions,
                   args.image or PLACEHOLDER_IMAGE, args.project or PLACEHOLDER_PROJECT)
    out: Path = args.out or COMMITTED
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() == COMMITTED:
        for stale in set(p.name for p in out.glob("*.yaml")) - set(files):  # a region left the table
            (out / stale).unlink()
    for name, text in files.items():
        (out / name).write_text(text)
    print(f"render.py: {len(files)} services in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
