"""The realistic traffic model: who pulls what, and what the server must answer.

Shared by every load generator of the benchmarks, so they all send the
same mix and hold the server to the same answers: the Locust suite
(locustfile.py, which checks every answer exactly), the open-loop wrk2
benchmark (latency_open_loop.py, which writes the mix into a file its Lua
hook sends) and the access-log replay (access_replay.py). It imports no
load generator, so any of them can use it.

- Images come from `pull_catalog`: Zipf-like popularity (pause, coredns and
  the control plane dominate), layers shared between images built on the
  same base.
- Client locations are a weighted mix: AWS regions weighted like upstream's
  traffic (us-west-2 about 21.5% of AWS, ten regions cover 90%), Google
  Cloud, Azure and unknown clients. Addresses are real: picked from the
  same range data the server loads (`ARCHEIO_RANGES_DIR`, else the embedded
  data) through iprange's public API, and sent as
  `X-Forwarded-For: <address>, 127.0.0.1` (one trusted proxy, like Google's
  load balancer).
- A share of blobs (`BENCH_MISSING_SHARE`) is missing from the mirrors, so
  those requests take the fallback path; the stand-in bucket
  (standin_bucket.py, same share) answers the server's HEADs.

The expected answer is computed here, independently of the server's code,
from the same settings the server reads: `ARCHEIO_MIRRORS_FILE` (parsed
with archeio.config.parse_mirrors), `ARCHEIO_RANGES_DIR`,
`UPSTREAM_REGISTRY_ENDPOINT`, `UPSTREAM_REGISTRY_PATH` and
`DEFAULT_AWS_BASE_URL`, with the server's defaults.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pull_catalog import Image, build_catalog, in_mirrors, zipf_weights  # noqa: E402

from archeio.config import builtin_mirrors, parse_mirrors  # noqa: E402
from iprange import GCP, CloudIndex, InvalidAddress, Placement, load_index  # noqa: E402

# Upstream's AWS traffic by region, roughly: us-west-2 about 21.5%, the
# first ten regions about 90%; the rest is spread over ten smaller regions.
AWS_REGIONS = {
    "us-west-2": 21.5, "us-east-1": 18.0, "us-east-2": 12.0, "eu-central-1": 9.0, "eu-west-1": 8.0,
    "ap-northeast-1": 6.0, "ap-south-1": 5.0, "ap-southeast-1": 4.0, "eu-west-2": 3.5, "ap-southeast-2": 3.0,
    "eu-west-3": 1.0, "ca-central-1": 1.0, "sa-east-1": 1.0, "eu-north-1": 1.0, "ap-northeast-2": 1.0,
    "us-west-1": 1.0, "eu-south-1": 1.0, "me-south-1": 1.0, "af-south-1": 1.0, "ap-east-1": 1.0,
}
UNKNOWN = "unknown"
ADDRESSES_PER_GROUP = 6
# The rig's one trusted proxy: the server takes the entry before it.
TRUSTED_PROXY = "127.0.0.1"

# The OCI grammar (distribution spec), written out here rather than taken
# from the server, so a server that drifts from it is caught.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PULL_PATH = re.compile(
    rf"/v2/(?P<name>{_COMPONENT}(?:/{_COMPONENT})*)/(?:"
    r"blobs/(?P<blob>sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})"
    r"|manifests/(?P<ref>sha256:[a-f0-9]{64}|[A-Za-z0-9_][A-Za-z0-9._-]{0,127})"
    r"|(?P<tags>tags/list))"
)
_SIGNATURE_TAG = re.compile(r"sha256-[a-f0-9]{64}\.(?:sig|att)")


def env_value(name: str, default: str, env: Mapping[str, str] | None = None) -> str:
    return (env if env is not None else os.environ).get(name) or default


@dataclass(frozen=True)
class Client:
    """One client address, with where the server should send its blobs."""

    forwarded: str  # the X-Forwarded-For header
    placement: Placement | None
    mirror: str | None  # None: Google Cloud, blobs always go upstream


@dataclass(frozen=True)
class Step:
    """One request, with the answer it must get."""

    method: str
    path: str
    name: str  # the statistics row
    status: int
    location: str | None


class Expectations:
    """The settings the server reads, and what it must answer under them."""

    def __init__(self, env: Mapping[str, str]) -> None:
        endpoint = env.get("UPSTREAM_REGISTRY_ENDPOINT") or "https://us-central1-docker.pkg.dev"
        path = (env.get("UPSTREAM_REGISTRY_PATH") or "k8s-artifacts-prod/images").strip("/")
        self.upstream = endpoint.rstrip("/") + "/v2/" + (path + "/" if path else "")
        self.upstream_path = path
        self.default_mirror = (env.get("DEFAULT_AWS_BASE_URL") or "https://d1be1w964nk82h.cloudfront.net").rstrip("/")
        self.signature_endpoint = env.get("SIGNATURE_UPSTREAM_ENDPOINT") or ""
        mirrors_file = env.get("ARCHEIO_MIRRORS_FILE")
        self.mirrors = parse_mirrors(Path(mirrors_file).read_text()) if mirrors_file else builtin_mirrors()
        ranges_dir = env.get("ARCHEIO_RANGES_DIR")
        self.index: CloudIndex = load_index(Path(ranges_dir) if ranges_dir else None)
        self.missing_share = float(env.get("BENCH_MISSING_SHARE") or "0.05")

    def mirror_for(self, placement: Placement | None) -> str | None:
        if placement is None:
            return self.default_mirror
        if placement.cloud == GCP:
            return None
        return self.mirrors.mirror_url_for(placement.cloud, placement.region) or self.default_mirror

    def client(self, address: str) -> Client | None:
        """The client at `address` as the rig forwards it; None for an address that is no address."""
        try:
            placement = self.index.lookup(address)
        except (InvalidAddress, ValueError):
            return None
        return Client(f"{address}, {TRUSTED_PROXY}", placement, self.mirror_for(placement))

    def blob_location(self, client: Client, name: str, digest: str) -> str:
        # The stand-in bucket holds what `in_mirrors` says, for any digest.
        if client.mirror is not None and in_mirrors(digest, self.missing_share):
            return f"{client.mirror}/containers/images/{digest}"
        return f"{self.upstream}{name}/blobs/{digest}"

    def pull(self, image: Image, client: Client, head_first: bool) -> list[Step]:
        """The requests of one pull, in order, each with its expected answer."""
        manifests = f"/v2/{image.name}/manifests/"
        upstream = f"{self.upstream}{image.name}/manifests/"
        steps = [Step("GET", "/v2/", "GET /v2/", 200, None)]
        if head_first:  # containerd: resolve the tag, then fetch the index by digest
            steps += [
                Step("HEAD", manifests + image.tag, "HEAD manifest by tag", 307, upstream + image.tag),
                Step("GET", manifests + image.index_digest, "GET index by digest", 307,
                     upstream + image.index_digest),
            ]
        else:  # docker: fetch the tag
            steps.append(Step("GET", manifests + image.tag, "GET manifest by tag", 307, upstream + image.tag))
        steps.append(Step("GET", manifests + image.manifest_digest, "GET manifest by digest", 307,
                          upstream + image.manifest_digest))
        for blob, kind in [(image.config_digest, "config"), *((layer, "layer") for layer in image.layers)]:
            steps.append(Step("GET", f"/v2/{image.name}/blobs/{blob}", f"GET {kind} blob", 307,
                              self.blob_location(client, image.name, blob)))
        return steps

    def answer_for(self, method: str, target: str, client: Client | None) -> Step | None:
        """The answer to any pull request, or None where this model does not predict one.

        Predicted: `/v2/`, blobs, manifests and tag lists whose path follows
        the OCI grammar, without a query, by GET or HEAD, from a valid
        client address. Anything else (other methods, odd paths, queries,
        names already under the upstream path, signature tags with their
        own endpoint) is left to the caller.
        """
        if method not in ("GET", "HEAD") or "?" in target:
            return None
        if target in ("/v2/", "/v2"):
            return Step(method, target, f"{method} /v2/", 200, None)
        match = _PULL_PATH.fullmatch(target)
        if match is None:
            return None
        name = match["name"]
        if self.upstream_path and (name + "/").startswith(self.upstream_path + "/"):
            return None  # a name already under the upstream path: the server does not prefix it twice
        if match["blob"]:
            if client is None:
                return None
            return Step(method, target, f"{method} blob", 307, self.blob_location(client, name, match["blob"]))
        if match["tags"]:
            return Step(method, target, f"{method} tags", 307, f"{self.upstream}{name}/tags/list")
        ref = match["ref"]
        if self.signature_endpoint and _SIGNATURE_TAG.fullmatch(ref):
            return None
        return Step(method, target, f"{method} manifest", 307, f"{self.upstream}{name}/manifests/{ref}")


def _address_in(prefix: str, rng: random.Random) -> str:
    network = ipaddress.ip_network(prefix)
    if network.num_addresses <= 2:
        return str(network.network_address)
    return str(network.network_address + rng.randrange(1, min(network.num_addresses - 1, 1 << 32)))


def pick_addresses(index: CloudIndex, cloud: str, region: str | None, want: int, ipv6_share: float,
                   rng: random.Random) -> list[str]:
    """Real addresses the index places in `cloud` (and `region`, when given)."""
    provider = index.providers.get(cloud)
    if provider is None:
        return []
    prefixes = [p for p, r in provider.prefixes if region is None or r == region]
    by_family = {
        6: [p for p in prefixes if ":" in p],
        4: [p for p in prefixes if ":" not in p],
    }
    found: list[str] = []
    for _ in range(want * 20):
        if len(found) >= want:
            break
        family = 6 if by_family[6] and rng.random() < ipv6_share else 4
        if not by_family[family]:
            continue
        address = _address_in(rng.choice(by_family[family]), rng)
        placement = index.lookup(address)
        # Nested prefixes: keep only addresses whose most specific prefix
        # still says this cloud and region.
        if placement is not None and placement.cloud == cloud and (region is None or placement.region == region):
            found.append(address)
    return found


def unknown_addresses(index: CloudIndex, want: int, rng: random.Random) -> list[str]:
    """Public addresses in no provider's range (home and office clients)."""
    found: list[str] = []
    while len(found) < want:
        address = str(ipaddress.IPv4Address(rng.randrange(1 << 24, 223 << 24)))
        parsed = ipaddress.IPv4Address(address)
        if parsed.is_global and index.lookup(address) is None:
            found.append(address)
    return found


def build_clients(expect: Expectations, mix: dict[str, float], ipv6_share: float,
                  rng: random.Random) -> tuple[list[Client], list[float]]:
    """Client addresses with their weights; a cloud absent from the data counts as unknown."""
    groups: list[tuple[float, list[str]]] = []
    unknown_weight = mix.get(UNKNOWN, 0.0)
    for cloud, share in mix.items():
        if cloud == UNKNOWN or share <= 0:
            continue
        if cloud == "AWS":
            total = sum(AWS_REGIONS.values())
            regions: dict[str | None, float] = {r: share * w / total for r, w in AWS_REGIONS.items()}
        else:
            regions = {None: share}
        for region, weight in regions.items():
            addresses = pick_addresses(expect.index, cloud, region, ADDRESSES_PER_GROUP, ipv6_share, rng)
            if addresses:
                groups.append((weight, addresses))
            else:
                unknown_weight += weight
    if unknown_weight > 0:
        groups.append((unknown_weight, unknown_addresses(expect.index, ADDRESSES_PER_GROUP, rng)))
    clients: list[Client] = []
    weights: list[float] = []
    for weight, addresses in groups:
        for address in addresses:
            client = expect.client(address)
            assert client is not None  # picked through the same index
            clients.append(client)
            weights.append(weight / len(addresses))
    return clients, weights


def parse_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for item in text.split(","):
        cloud, _, share = item.partition("=")
        mix[cloud.strip()] = float(share)
    return mix


class Traffic:
    """Everything a simulated client draws from: catalog, popularity, clients. Built once per process."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env)
        seed = int(env_value("BENCH_SEED", "1", env))
        self.expect = Expectations(env)
        self.catalog = build_catalog(seed, int(env_value("BENCH_IMAGES", "60", env)))
        self.popularity = zipf_weights(len(self.catalog))
        self.head_first = float(env_value("BENCH_HEAD_FIRST", "0.5", env))
        self.clients, self.client_weights = build_clients(
            self.expect, parse_mix(env_value("BENCH_CLIENTS", "AWS=0.6,GCP=0.2,Azure=0.05,unknown=0.15", env)),
            float(env_value("BENCH_IPV6_SHARE", "0.1", env)), random.Random(seed),
        )

    def next_pull(self, rng: random.Random) -> tuple[Client, list[Step]]:
        image = rng.choices(self.catalog, self.popularity)[0]
        client = rng.choices(self.clients, self.client_weights)[0]
        return client, self.expect.pull(image, client, rng.random() < self.head_first)

    def requests(self, count: int, rng: random.Random) -> list[tuple[Client, Step]]:
        """`count` requests of whole pulls in pull order, as one client after another sends them."""
        found: list[tuple[Client, Step]] = []
        while len(found) < count:
            client, steps = self.next_pull(rng)
            found += [(client, step) for step in steps]
        return found[:count]
