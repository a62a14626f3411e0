"""Small but real OCI images, built offline, written as OCI layouts and pushed with skopeo.

An image here is what a registry really holds: gzip-compressed tar layers,
a config naming their uncompressed digests (diff_ids), an OCI image
manifest, and for multi-platform images an image index pointing at one
manifest per platform. `cosign_signature` builds the manifest cosign
pushes under the tag `sha256-<hex>.sig`: a simple-signing payload layer
with a real ECDSA P-256 signature in its annotation.

Everything is deterministic (fixed mtimes, no gzip timestamp), and every
layer's content names its image and platform, so no two images share a
blob: a blob's digest tells which image it belongs to, which the
"where did it come from" assertions rely on.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .services import require_tools

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
COSIGN_PAYLOAD = "application/vnd.dev.cosign.simplesigning.v1+json"
COSIGN_SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class Blob:
    """Content-addressed bytes with their media type."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self, **extra: object) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data), **extra}


def canonical_json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"

    def as_dict(self) -> dict[str, str]:
        return {"os": self.os, "architecture": self.architecture}


@dataclass(frozen=True)
class Image:
    """One pushable image: a manifest (single platform) or an index with children.

    `manifest` is the top-level object a tag points at; `children` the
    per-platform images of an index; `blobs` the config and layer blobs of
    the image and all its children (what a mirror holds).
    """

    name: str
    manifest: Blob
    config: Blob | None = None
    layers: tuple[Blob, ...] = ()
    children: tuple[Image, ...] = ()
    platform: Platform | None = None

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def is_index(self) -> bool:
        return self.manifest.media_type == OCI_INDEX

    @property
    def blobs(self) -> tuple[Blob, ...]:
        own = ((self.config,) if self.config else ()) + self.layers
        return own + tuple(b for child in self.children for b in child.blobs)

    @property
    def manifests(self) -> tuple[Blob, ...]:
        """The top-level manifest and every child manifest."""
        return (self.manifest,) + tuple(m for child in self.children for m in child.manifests)


def tar_gz(files: Mapping[str, bytes]) -> tuple[bytes, str]:
    """A gzip tar layer of `files` and its diff_id (the digest of the plain tar)."""
    plain = io.BytesIO()
    directories = sorted({str(parent) for path in files for parent in PurePosixPath(path).parents} - {"."})
    with tarfile.open(fileobj=plain, mode="w", format=tarfile.PAX_FORMAT) as tar:
        # Real layers carry their directories before the files in them.
        for directory in directories:
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mtime = 1_700_000_000
            info.mode = 0o755
            tar.addfile(info)
        for path, content in sorted(files.items()):
            info = tarfile.TarInfo(path)
            info.size = len(content)
            info.mtime = 1_700_000_000
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(content))
    raw = plain.getvalue()
    return gzip.compress(raw, mtime=0), "sha256:" + hashlib.sha256(raw).hexdigest()


def build_image(
    name: str, layers: Iterable[Mapping[str, bytes]], platform: Platform = Platform(),
    annotations: Mapping[str, str] | None = None,
) -> Image:
    """A single-platform image whose layers hold `layers` (one file map each)."""
    blobs, diff_ids = [], []
    for files in layers:
        data, diff_id = tar_gz(files)
        blobs.append(Blob(OCI_LAYER, data))
        diff_ids.append(diff_id)
    config = Blob(OCI_CONFIG, canonical_json({
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {"Cmd": ["/bin/true"], "Labels": {"archeio.test/image": name}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "created": "2023-11-14T22:13:20Z",
    }))
    manifest: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [b.descriptor() for b in blobs],
    }
    if annotations:
        manifest["annotations"] = dict(annotations)
    return Image(name, Blob(OCI_MANIFEST, canonical_json(manifest)), config, tuple(blobs), platform=platform)


def sample_image(name: str, layer_count: int = 2, size: int = 4096, platform: Platform = Platform()) -> Image:
    """An image of `layer_count` layers with content unique to (name, platform)."""
    label = f"{name}/{platform.os}/{platform.architecture}"
    layers = []
    for i in range(layer_count):
        seed = hashlib.sha256(f"{label}/layer{i}".encode()).digest()
        # Pseudo-random bytes so gzip cannot shrink layers to nothing.
        filler = b"".join(hashlib.sha256(seed + n.to_bytes(4, "big")).digest() for n in range(size // 32))
        layers.append({f"data/{i}.bin": filler, "etc/image": label.encode() + b"\n"})
    return build_image(name, layers, platform)


def multi_platform_image(name: str, platforms: Iterable[Platform]) -> Image:
    """An image index with one child image per platform."""
    children = tuple(sample_image(name, platform=p) for p in platforms)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [c.manifest.descriptor(platform=c.platform.as_dict()) for c in children if c.platform],
    }
    return Image(name, Blob(OCI_INDEX, canonical_json(index)), children=children)


def signature_tag(digest: str) -> str:
    """cosign's tag for the signature of the manifest `digest`."""
    algorithm, _, hex_digest = digest.partition(":")
    return f"{algorithm}-{hex_digest}.sig"


def cosign_signature(name: str, reference: str, signed: Image) -> Image:
    """The manifest cosign would push for `signed`, with a real ECDSA signature."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    payload = canonical_json({
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": signed.digest},
            "type": "cosign container image signature",
        },
        "optional": None,
    })
    key = ec.generate_private_key(ec.SECP256R1())
    signature = base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()
    layer = Blob(COSIGN_PAYLOAD, payload)
    config = Blob(OCI_CONFIG, canonical_json({
        "architecture": "", "os": "", "config": {},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(payload).hexdigest()]},
    }))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor(annotations={COSIGN_SIGNATURE_ANNOTATION: signature})],
    }
    return Image(name, Blob(OCI_MANIFEST, canonical_json(manifest)), config, (layer,))


# -- OCI layout and push ---------------------------------------------------------------


@dataclass
class Layout:
    """An OCI image layout directory holding images under ref names."""

    path: Path
    refs: dict[str, Blob] = field(default_factory=dict)

    def add(self, image: Image, ref: str) -> None:
        """Write every blob of `image` and name its top-level manifest `ref`."""
        blobs_dir = self.path / "blobs" / "sha256"
        blobs_dir.mkdir(parents=True, exist_ok=True)
        for blob in image.manifests + image.blobs:
            target = blobs_dir / blob.digest.removeprefix("sha256:")
            if not target.exists():
                target.write_bytes(blob.data)
        self.refs[ref] = image.manifest
        (self.path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [m.descriptor(annotations={REF_NAME: r}) for r, m in self.refs.items()],
        }
        (self.path / "index.json").write_text(json.dumps(index))


def skopeo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run skopeo with a permissive policy; RuntimeError with its stderr on failure."""
    program = require_tools("skopeo")["skopeo"]
    argv = [program, "--insecure-policy", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}):\n{done.stderr}")
    return done


def push(layout: Layout, ref: str, registry_host: str, repository: str, tag: str) -> None:
    """`skopeo copy` one layout ref to `<registry_host>/<repository>:<tag>`, digests kept."""
    image = layout.refs[ref]
    skopeo(
        "copy", "--all", "--preserve-digests", "--dest-tls-verify=false", "--dest-no-creds",
        f"oci:{layout.path}:{ref}", f"docker://{registry_host}/{repository}:{tag}",
    )
    # The registry must hold exactly what was built, byte for byte.
    url = f"http://{registry_host}/v2/{repository}/manifests/{image.digest}"
    request = urllib.request.Request(url, headers={"Accept": image.media_type})
    with urllib.request.urlopen(request, timeout=10) as response:
        stored = response.read()
    if stored != image.data:
        raise RuntimeError(f"{url}: the registry holds a different manifest than was pushed")


# -- artifacts that refer to an image (the referrers API) ------------------------------------

OCI_EMPTY = "application/vnd.oci.empty.v1+json"


def referrer(name: str, subject: Image, artifact_type: str) -> Image:
    """An OCI artifact manifest whose `subject` is `subject` (an SBOM, a signature...)."""
    config = Blob(OCI_EMPTY, b"{}")
    payload = Blob("application/json", canonical_json({"describes": subject.digest, "artifact": name}))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": config.descriptor(),
        "layers": [payload.descriptor()],
        "subject": subject.manifest.descriptor(),
        "annotations": {"org.example.name": name},
    }
    return Image(name, Blob(OCI_MANIFEST, canonical_json(manifest)), config, (payload,))


def referrers_index(artifacts: Iterable[Image]) -> Image:
    """The index a client keeps under the referrers tag schema (`<alg>-<hex>`)."""
    descriptors = []
    for artifact in artifacts:
        doc = json.loads(artifact.manifest.data)
        descriptors.append(artifact.manifest.descriptor(
            artifactType=doc["artifactType"], annotations=doc["annotations"],
        ))
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    return Image("referrers", Blob(OCI_INDEX, canonical_json(index)))


def push_over_http(registry_url: str, repository: str, reference: str, image: Image) -> None:
    """Upload `image`'s blobs and put its manifest at `reference`, with plain registry API calls.

    skopeo 1.9 does not copy artifacts (empty configs, `subject`), so these
    go in the way a client of the distribution spec pushes them.
    """
    for blob in image.blobs:
        start = urllib.request.Request(f"{registry_url}/v2/{repository}/blobs/uploads/", method="POST", data=b"")
        with urllib.request.urlopen(start, timeout=10) as response:
            location = urllib.parse.urljoin(registry_url, response.headers["Location"])
        separator = "&" if "?" in location else "?"
        upload = urllib.request.Request(
            f"{location}{separator}digest={blob.digest}", method="PUT", data=blob.data,
            headers={"Content-Type": "application/octet-stream"},
        )
        urllib.request.urlopen(upload, timeout=10).close()
    put = urllib.request.Request(
        f"{registry_url}/v2/{repository}/manifests/{reference}", method="PUT", data=image.manifest.data,
        headers={"Content-Type": image.manifest.media_type},
    )
    urllib.request.urlopen(put, timeout=10).close()
