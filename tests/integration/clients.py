"""Real clients as the tests drive them, and the check of where a pull's blobs came from."""

from __future__ import annotations

import json
from pathlib import Path

from . import images
from .places import REGISTRY, Mark, Places
from .services import Proxy
from .topology import BUCKET_OF_CLIENT, Catalog


def skopeo_inspect(proxy: Proxy, client: str, reference: str, *extra: str) -> str:
    return images.skopeo(
        "inspect", "--tls-verify=false", "--no-creds", *extra,
        f"docker://{proxy.host(client)}/{reference}",
    ).stdout


def skopeo_copy(proxy: Proxy, client: str, reference: str, destination: Path, *extra: str) -> Path:
    """Copy `reference` through `client`'s listener into a fresh OCI layout; its path."""
    images.skopeo(
        "copy", "--tls-verify=false", "--src-no-creds", "--preserve-digests", *extra,
        f"docker://{proxy.host(client)}/{reference}", f"oci:{destination}:pulled",
    )
    return destination


def pulled_digest(layout: Path) -> str:
    """The digest the layout's `pulled` ref points at."""
    index = json.loads((layout / "index.json").read_text())
    [descriptor] = [
        m for m in index["manifests"]
        if m.get("annotations", {}).get(images.REF_NAME) == "pulled"
    ]
    return str(descriptor["digest"])


def layout_blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def expected_place(catalog: Catalog, client: str, digest: str) -> str:
    """Where `client` must get blob `digest` from: its bucket if that holds it, else the registry."""
    bucket = BUCKET_OF_CLIENT[client]
    return bucket if bucket is not None and catalog.bucket_holds(bucket, digest) else REGISTRY


def assert_served_from_right_place(
    places: Places, mark: Mark, catalog: Catalog, client: str, blobs: tuple[images.Blob, ...],
) -> None:
    """Each blob was fetched (GET) from its expected place only, and only the
    client's own bucket was asked whether it holds the blob (archeio's HEAD),
    and the registry, by the signature fallback, only for a blob it serves."""
    own_bucket = BUCKET_OF_CLIENT[client]
    for blob in blobs:
        expected = expected_place(catalog, client, blob.digest)
        served = places.blob_gets_since(mark, blob.digest)
        assert set(served) == {expected}, (
            f"{client}: blob {blob.digest} ({blob.media_type}) should come from {expected}, "
            f"GETs seen: {dict(served)}"
        )
        allowed = ({own_bucket} if own_bucket else set()) | ({REGISTRY} if expected == REGISTRY else set())
        checked = set(places.blob_requests_since(mark, blob.digest, "HEAD"))
        assert checked <= allowed, f"{client}: blob {blob.digest} was checked in {checked}, not only in {allowed}"
