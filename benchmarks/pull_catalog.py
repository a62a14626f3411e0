"""The image catalog the load test pulls from: deterministic, skewed, with shared layers.

Modelled on what registry.k8s.io serves: a few images (pause, coredns,
kube-proxy, the control plane) take most pulls, a long tail of add-ons takes
the rest, and images built on the same base share their bottom layers.
Popularity is Zipf-like (weight 1/rank^s), so the first images dominate.

Everything here is a pure function of a seed, so the load generator (which
checks every Location) and the stand-in bucket (which answers HEADs) agree
on which blobs the mirrors hold without sharing any file.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

# Real image names first: they take the top popularity ranks.
_WELL_KNOWN = (
    "pause", "coredns/coredns", "kube-proxy", "etcd", "kube-apiserver",
    "kube-controller-manager", "kube-scheduler", "metrics-server/metrics-server",
    "ingress-nginx/controller", "dns/k8s-dns-node-cache",
    "sig-storage/csi-node-driver-registrar", "sig-storage/csi-provisioner",
    "sig-storage/csi-attacher", "sig-storage/livenessprobe", "autoscaling/cluster-autoscaler",
    "kas-network-proxy/proxy-agent", "sig-storage/snapshot-controller", "nfd/node-feature-discovery",
    "provider-aws/cloud-controller-manager", "external-dns/external-dns",
)
# Base images whose layers many images share (distroless, debian-base, ...).
_BASES = 4


@dataclass(frozen=True)
class Image:
    """One pullable image: its tag, index and platform manifest, config and layers."""

    name: str
    tag: str
    index_digest: str
    manifest_digest: str
    config_digest: str
    layers: tuple[str, ...]

    @property
    def blobs(self) -> tuple[str, ...]:
        return (self.config_digest, *self.layers)


def digest_of(*parts: object) -> str:
    return "sha256:" + hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()


def build_catalog(seed: int = 1, images: int = 60) -> list[Image]:
    """`images` images, most popular first."""
    rng = random.Random(seed)
    bases = [tuple(digest_of(seed, "base", b, i) for i in range(rng.randint(1, 2))) for b in range(_BASES)]
    catalog: list[Image] = []
    for rank in range(images):
        name = _WELL_KNOWN[rank] if rank < len(_WELL_KNOWN) else f"addons/component-{rank:03d}"
        tag = f"v1.{rng.randint(20, 33)}.{rng.randint(0, 9)}"
        own = tuple(digest_of(seed, name, tag, "layer", i) for i in range(rng.randint(1, 4)))
        # pause is a single layer; most others sit on a shared base.
        shared = () if name == "pause" else bases[rng.randrange(_BASES)]
        catalog.append(Image(
            name=name, tag=tag,
            index_digest=digest_of(seed, name, tag, "index"),
            manifest_digest=digest_of(seed, name, tag, "manifest"),
            config_digest=digest_of(seed, name, tag, "config"),
            layers=shared + own,
        ))
    return catalog


def zipf_weights(count: int, exponent: float = 1.1) -> list[float]:
    return [1.0 / (rank ** exponent) for rank in range(1, count + 1)]


def in_mirrors(digest: str, missing_share: float) -> bool:
    """Does the mirror hold this blob? A fixed share of blobs is missing (fallback path).

    Decided by a hash of the digest, so the same blobs are missing in every
    process and every run.
    """
    bucket = int(hashlib.sha256(b"missing:" + digest.encode()).hexdigest()[:8], 16) % 10_000
    return bucket >= missing_share * 10_000
