"""Realistic registry traffic for Locust: image pulls from clients all over the clouds.

Each simulated client pulls one image after another, as container runtimes
do: `GET /v2/`, then either containerd's way (`HEAD` the tag, `GET` the
index by digest) or docker's (`GET` the tag), then the platform manifest by
digest, the config blob and every layer blob. Every answer is checked: the
status, and for redirects the exact `Location` this file expects. A wrong
redirect is a failure in Locust's statistics, not merely a slow request.

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
  (standin_bucket.py, same seed and share) answers the server's HEADs.

The expected Location is computed here, independently of the server's
code, from the same settings the server reads: `ARCHEIO_MIRRORS_FILE`
(parsed with archeio.config.parse_mirrors), `ARCHEIO_RANGES_DIR`,
`UPSTREAM_REGISTRY_ENDPOINT`, `UPSTREAM_REGISTRY_PATH` and
`DEFAULT_AWS_BASE_URL`, with the server's defaults.

Knobs (environment variables, so other scripts can reuse this file):

| variable | default | meaning |
| --- | --- | --- |
| BENCH_USER_RATE | 50 | requests/s each user sends (constant-throughput pacing); 0: no pacing |
| BENCH_SEED | 1 | catalog and client seed (the bucket must use the same) |
| BENCH_IMAGES | 60 | images in the catalog (the bucket must use the same) |
| BENCH_MISSING_SHARE | 0.05 | share of blobs the mirrors lack (the bucket must use the same) |
| BENCH_HEAD_FIRST | 0.5 | share of pulls that HEAD the tag first (containerd) |
| BENCH_CLIENTS | AWS=0.6,GCP=0.2,Azure=0.05,unknown=0.15 | client mix by cloud |
| BENCH_IPV6_SHARE | 0.1 | share of cloud clients with an IPv6 address |
| BENCH_CHECK | 1 | 0: do not check answers (for a baseline server such as a fixed-307 nginx) |
| BENCH_WARMUP | 0 | seconds after the start left out of the summary |
| BENCH_SUMMARY_FILE | (none) | write exact latency percentiles and rates of the run here (JSON) |
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, constant, constant_throughput, events, task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pull_catalog import Image, build_catalog, in_mirrors, zipf_weights  # noqa: E402

from archeio.config import builtin_mirrors, parse_mirrors  # noqa: E402
from iprange import GCP, CloudIndex, Placement, load_index  # noqa: E402

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


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


@dataclass(frozen=True)
class Client:
    """One client address, with where the server should send its blobs."""

    forwarded: str  # the X-Forwarded-For header
    placement: Placement | None
    mirror: str | None  # None: Google Cloud, blobs always go upstream


@dataclass(frozen=True)
class Step:
    """One request of a pull, with the answer it must get."""

    method: str
    path: str
    name: str  # the statistics row
    status: int
    location: str | None


class Expectations:
    """The settings the server reads, and what it must answer under them."""

    def __init__(self, env: dict[str, str]) -> None:
        endpoint = env.get("UPSTREAM_REGISTRY_ENDPOINT") or "https://us-central1-docker.pkg.dev"
        path = (env.get("UPSTREAM_REGISTRY_PATH") or "k8s-artifacts-prod/images").strip("/")
        self.upstream = endpoint.rstrip("/") + "/v2/" + (path + "/" if path else "")
        self.default_mirror = (env.get("DEFAULT_AWS_BASE_URL") or "https://d1be1w964nk82h.cloudfront.net").rstrip("/")
        mirrors_file = env.get("ARCHEIO_MIRRORS_FILE")
        self.mirrors = parse_mirrors(Path(mirrors_file).read_text()) if mirrors_file else builtin_mirrors()
        ranges_dir = env.get("ARCHEIO_RANGES_DIR")
        self.index: CloudIndex = load_index(Path(ranges_dir) if ranges_dir else None)
        self.missing_share = float(_env("BENCH_MISSING_SHARE", "0.05"))

    def mirror_for(self, placement: Placement | None) -> str | None:
        if placement is None:
            return self.default_mirror
        if placement.cloud == GCP:
            return None
        return self.mirrors.mirror_url_for(placement.cloud, placement.region) or self.default_mirror

    def blob_location(self, client: Client, name: str, digest: str) -> str:
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
            placement = expect.index.lookup(address)
            clients.append(Client(f"{address}, 127.0.0.1", placement, expect.mirror_for(placement)))
            weights.append(weight / len(addresses))
    return clients, weights


def parse_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for item in text.split(","):
        cloud, _, share = item.partition("=")
        mix[cloud.strip()] = float(share)
    return mix


class Traffic:
    """Everything a user draws from: catalog, popularity, clients. Built once per process."""

    def __init__(self) -> None:
        seed = int(_env("BENCH_SEED", "1"))
        self.expect = Expectations(dict(os.environ))
        self.catalog = build_catalog(seed, int(_env("BENCH_IMAGES", "60")))
        self.popularity = zipf_weights(len(self.catalog))
        self.head_first = float(_env("BENCH_HEAD_FIRST", "0.5"))
        self.clients, self.client_weights = build_clients(
            self.expect, parse_mix(_env("BENCH_CLIENTS", "AWS=0.6,GCP=0.2,Azure=0.05,unknown=0.15")),
            float(_env("BENCH_IPV6_SHARE", "0.1")), random.Random(seed),
        )

    def next_pull(self, rng: random.Random) -> tuple[Client, list[Step]]:
        image = rng.choices(self.catalog, self.popularity)[0]
        client = rng.choices(self.clients, self.client_weights)[0]
        return client, self.expect.pull(image, client, rng.random() < self.head_first)


_traffic: Traffic | None = None


def traffic() -> Traffic:
    global _traffic
    if _traffic is None:
        _traffic = Traffic()
    return _traffic


class Summary:
    """Exact latency percentiles and rates over the measured window (after the warm-up)."""

    def __init__(self) -> None:
        self.warmup = float(_env("BENCH_WARMUP", "0"))
        self.started = 0.0
        self.window_start = 0.0
        self.cpu_start = 0.0
        self.latencies: list[float] = []
        self.failures = 0
        self.failure_examples: Counter[str] = Counter()
        self.cpu_warnings = 0

    def on_start(self) -> None:
        self.started = time.monotonic()

    def on_request(self, response_time: float, exception: BaseException | None) -> None:
        now = time.monotonic()
        if now - self.started < self.warmup:
            return
        if not self.window_start:
            self.window_start = now
            self.cpu_start = _process_cpu()
        self.latencies.append(response_time)
        if exception is not None:
            self.failures += 1
            if len(self.failure_examples) < 20:
                self.failure_examples[str(exception)[:1000]] += 1

    def result(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.window_start if self.window_start else 0.0
        ordered = sorted(self.latencies)

        def percentile(p: float) -> float | None:
            if not ordered:
                return None
            return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 3)

        return {
            "window_seconds": round(seconds, 2),
            "requests": len(ordered),
            "failures": self.failures,
            "achieved_rps": round(len(ordered) / seconds, 1) if seconds else 0.0,
            "p50_ms": percentile(50), "p95_ms": percentile(95), "p99_ms": percentile(99),
            "p999_ms": percentile(99.9), "max_ms": round(ordered[-1], 3) if ordered else None,
            "generator_cpu_share": round((_process_cpu() - self.cpu_start) / seconds, 3) if seconds else None,
            "generator_cpu_warnings": self.cpu_warnings,
            "failure_examples": dict(self.failure_examples),
        }


def _process_cpu() -> float:
    times = os.times()
    return times.user + times.system


summary = Summary()


@events.test_start.add_listener
def _on_test_start(**_: Any) -> None:
    traffic()  # build the catalog and clients before the first user runs
    summary.on_start()


@events.request.add_listener
def _on_request(response_time: float, exception: BaseException | None = None, **_: Any) -> None:
    summary.on_request(response_time, exception)


@events.cpu_warning.add_listener
def _on_cpu_warning(**_: Any) -> None:
    summary.cpu_warnings += 1


@events.test_stop.add_listener
def _on_test_stop(**_: Any) -> None:
    path = os.environ.get("BENCH_SUMMARY_FILE")
    if path:
        Path(path).write_text(json.dumps(summary.result(), indent=2) + "\n")


USER_RATE = float(_env("BENCH_USER_RATE", "50"))
# 0 only to measure the generator against a baseline that answers everything alike.
CHECK_ANSWERS = _env("BENCH_CHECK", "1") != "0"


class PullingClient(FastHttpUser):
    """A node pulling images: one request per task, paced, in pull order."""

    wait_time = constant_throughput(USER_RATE) if USER_RATE > 0 else constant(0)

    def on_start(self) -> None:
        self.rng = random.Random()
        if USER_RATE > 0:
            # Users spawn together; left in phase, they would all send at the
            # same instant every period and measure their own burst. A random
            # phase spreads the offered rate evenly over the period.
            gevent.sleep(self.rng.uniform(0, 1 / USER_RATE))
        self.steps: list[Step] = []
        self.headers: dict[str, str] = {}

    @task
    def next_request(self) -> None:
        if not self.steps:
            client, self.steps = traffic().next_pull(self.rng)
            self.steps.reverse()
            self.headers = {"X-Forwarded-For": client.forwarded}
        step = self.steps.pop()
        with self.client.request(step.method, step.path, name=step.name, headers=self.headers,
                                 allow_redirects=False, catch_response=True) as response:
            location = response.headers.get("Location")
            if not CHECK_ANSWERS:
                response.success()
            elif response.status_code != step.status or location != step.location:
                response.failure(f"{step.method} {step.path} from {self.headers['X-Forwarded-For']}: "
                                 f"got {response.status_code} {location!r}, "
                                 f"expected {step.status} {step.location!r}")
            elif step.status == 200 and response.headers.get("Docker-Distribution-Api-Version") != "registry/2.0":
                response.failure("GET /v2/ without Docker-Distribution-Api-Version: registry/2.0")
            else:
                response.success()
