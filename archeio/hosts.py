"""`archeio hosts`: every host a pull through this deployment may be sent to.

A pull starts at the registry's own name and is then redirected (307) to
other hosts: the source registry (manifests, tags, referrers, and blobs for
Google Cloud clients or blobs no mirror holds), the signature registry,
each blob mirror of the mirror table, and the default mirror. A proxy or
firewall that lets through only the registry's name passes manifests and
blocks blobs, so allow-lists need all of them. The list is made from the
same settings `archeio serve` reads (the mirror table included), and, with
`--regions FILE`, from a table of the deployments in other regions
(deploy/cloudrun/regions.toml): every http(s) URL value in that TOML file,
whatever its layout, is a host some region sends clients to. Guides that
quote the list are checked against this command by the tests, so they stay
true when the table or the settings change.

The root and privacy redirects (`/`, `/privacy`) are left out: no pull
follows them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .config import ConfigError, Settings, load_settings
from .config import add_arguments as add_setting_arguments

DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Host:
    """One host clients may be sent to, and every reason they may be."""

    host: str  # name[:port], the port only when the URL names a non-default one
    scheme: str
    reasons: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return {"host": self.host, "scheme": self.scheme, "reasons": list(self.reasons)}


def _host_of(url: str) -> tuple[str, str] | None:
    """(scheme, name[:port]) of an http(s) URL; None for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    name = parts.hostname.lower()
    if ":" in name:
        name = f"[{name}]"
    if port is not None and port != DEFAULT_PORTS[parts.scheme]:
        name = f"{name}:{port}"
    return parts.scheme, name


def setting_targets(settings: Settings) -> Iterator[tuple[str, str]]:
    """(URL, reason) for every base URL the server's answers may point a pull at."""
    yield (settings.upstream_registry_endpoint,
           "UPSTREAM_REGISTRY_ENDPOINT: manifests, tags and referrers; blobs for Google Cloud clients "
           "and blobs no mirror holds")
    if settings.signature_upstream_endpoint:
        reason = "SIGNATURE_UPSTREAM_ENDPOINT: signatures, attestations, referrers"
        if settings.signature_fallback:
            reason += "; manifests and blobs by digest the upstream lacks (the signature fallback)"
        yield settings.signature_upstream_endpoint, reason
    yield (settings.default_aws_base_url,
           "DEFAULT_AWS_BASE_URL: blobs for clients with no mirror of their own region")
    source = str(settings.mirrors_file) if settings.mirrors_file else "the built-in table"
    for cloud, regions in settings.mirrors.by_cloud.items():
        # One bucket may serve several regions: one reason naming them all.
        by_url: dict[str, list[str]] = {}
        for region, url in regions.items():
            by_url.setdefault(url, []).append(region)
        for url, served in by_url.items():
            yield url, f"blobs for {cloud} {', '.join(served)} ({source})"


def table_targets(path: Path, text: str) -> Iterator[tuple[str, str]]:
    """(URL, reason) for every http(s) URL value of a TOML table, at any depth.

    Values under sibling tables with the same key are one reason per URL:
    `regions.toml: default_mirror of regions asia-east1, europe-west1`.
    """
    found: dict[tuple[str, str, str], list[str]] = {}  # (URL, the tables' parent, key) -> tables

    def walk(value: object, where: tuple[str, ...]) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*where, str(key)))
        elif isinstance(value, list):
            for number, item in enumerate(value):
                walk(item, (*where[:-1], f"{where[-1]}[{number}]"))
        elif isinstance(value, str) and _host_of(value) is not None:
            parent, table, key = ".".join(where[:-2]), ".".join(where[-2:-1]), where[-1]
            found.setdefault((value, parent, key), []).append(table)

    walk(tomllib.loads(text), ())
    for (url, parent, key), tables in found.items():
        if not any(tables):
            yield url, f"{path.name}: {key}"
        else:
            yield url, f"{path.name}: {key} of {parent + ' ' if parent else ''}{', '.join(tables)}"


def collect(targets: Iterator[tuple[str, str]]) -> list[Host]:
    """Hosts sorted by name, each with its reasons in the order first met."""
    found: dict[tuple[str, str], list[str]] = {}
    for url, reason in targets:
        key = _host_of(url)
        if key is None:
            continue
        reasons = found.setdefault(key, [])
        if reason not in reasons:
            reasons.append(reason)
    return [Host(name, scheme, tuple(reasons)) for (scheme, name), reasons in
            sorted(found.items(), key=lambda item: (item[0][1], item[0][0]))]


def hosts(settings: Settings, regions: Path | None = None) -> list[Host]:
    """Every host a pull may be sent to with these settings (and the regions table)."""
    targets = list(setting_targets(settings))
    if regions is not None:
        found = list(table_targets(regions, regions.read_text(encoding="utf-8")))
        if not found:
            raise ValueError("no http(s) URL in it")
        targets += found
    return collect(iter(targets))


def render(found: list[Host]) -> str:
    width = max((len(h.host) for h in found), default=0)
    return "\n".join(f"{h.host:<{width}}  {'; '.join(h.reasons)}" for h in found)


# -- the command line ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--regions", type=Path, metavar="FILE", default=None,
                        help="a TOML table of the deployments in other regions "
                        "(deploy/cloudrun/regions.toml): its http(s) URLs are added")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--plain", action="store_true", help="host names only, one a line (for allow-lists)")
    output.add_argument("--json", action="store_true", help="print the hosts as JSON")
    add_setting_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        found = hosts(load_settings(overrides=vars(args)), args.regions)
    except ConfigError as exc:  # before the table is read: a ValueError too
        print(f"archeio: configuration error: {exc}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError) as exc:
        print(f"archeio hosts: --regions {args.regions}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([h.as_dict() for h in found], indent=2))
    elif args.plain:
        print("\n".join(h.host for h in found))
    else:
        print(render(found))
    return 0
