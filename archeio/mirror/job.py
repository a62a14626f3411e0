"""One mirror run: from image references to blobs in buckets and done markers.

The walk, for each repository (or the whole catalog):

1. list its tags (paginated), or take the one tag or digest given; where
   the registry's listing carries a `manifest` map (Google's registries),
   its untagged manifests are listed too, by digest (registry.Listed);
2. resolve each tag to its manifest digest with a HEAD, unless the map
   already said which;
3. skip the image if every bucket holds its done marker
   (`archeio-mirror/done/<repo>@<digest>`): no manifest is fetched;
4. otherwise fetch the manifest; an index leads to its child manifests, an
   image to its config and layer blobs; schema 1 and unknown types are
   reported and left alone;
5. make sure every blob is in every bucket (`BlobCopier`);
6. write the done marker into each bucket that now holds every blob, and
   one for each child manifest of an index: the map lists those children
   as untagged manifests of their own, and their markers let the next run
   skip them without fetching them.

Images are worked on by `concurrency` workers fed from a bounded queue, so a
registry of any size is walked in constant memory (but for the per-run sets
of digests seen). The source registry's own rate and concurrency limits sit
in `RegistryClient`; this module only decides what to ask for.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .copier import BlobCopier, BlobResult
from .progress import Progress
from .registry import (
    IMAGE,
    INDEX,
    Descriptor,
    ImageRef,
    Listed,
    Manifest,
    RegistryClient,
    RegistryError,
    is_digest,
    parse_manifest,
)
from .s3 import BucketStore

log = logging.getLogger("archeio.mirror")

T = TypeVar("T")
MAX_INDEX_DEPTH = 4  # an index of indexes of ... deeper than this is refused


@dataclass
class _Walk:
    """Everything one image (tag or digest) needs copied."""

    blobs: dict[str, Descriptor] = field(default_factory=dict)
    unsupported: list[str] = field(default_factory=list)
    manifests: int = 0
    children: list[str] = field(default_factory=list)  # manifests below the top one, at any depth


class MirrorJob:
    """Mirrors images from one registry into a set of buckets."""

    def __init__(self, registry: RegistryClient, stores: list[BucketStore], copier: BlobCopier,
                 progress: Progress, executor: Executor, concurrency: int = 8, dry_run: bool = False) -> None:
        self.registry = registry
        self.stores = stores
        self.copier = copier
        self.progress = progress
        self.executor = executor
        self.concurrency = concurrency
        self.dry_run = dry_run
        self._done: list[set[str]] = [set() for _ in stores]  # per bucket: "repo@digest"
        self._seen_images: set[str] = set()
        self._manifests: dict[str, Manifest] = {}  # digest -> parsed, shared across repositories

    async def run(self, refs: Iterable[ImageRef], all_repositories: bool = False) -> None:
        """Walk and copy everything; failures are counted in `progress`, never raised."""
        if not await self._load_done_markers():
            return
        queue: asyncio.Queue[tuple[str, Listed] | None] = asyncio.Queue(maxsize=self.concurrency * 4)
        workers = [asyncio.create_task(self._worker(queue)) for _ in range(self.concurrency)]
        try:
            await self._produce(queue, refs, all_repositories)
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()

    async def _load_done_markers(self) -> bool:
        for index, store in enumerate(self.stores):
            try:
                self._done[index] = await self._run(store.done_markers)
            except Exception as exc:  # noqa: BLE001 - one line to the operator, then stop
                self.progress.image_failed(f"bucket {store.bucket}", f"cannot list done markers: {exc}")
                return False
        return True

    async def _produce(self, queue: asyncio.Queue[tuple[str, Listed] | None], refs: Iterable[ImageRef],
                       all_repositories: bool) -> None:
        async def listing_of(repository: str) -> None:
            untagged = 0
            try:
                async for entry in self.registry.listing(repository):
                    untagged += entry.untagged
                    await queue.put((repository, entry))
            except RegistryError as exc:
                self.progress.image_failed(f"{repository} (listing tags)", exc)
            if untagged:
                self.progress.untagged_found(repository, untagged)

        for ref in refs:
            if ref.digest:
                await queue.put((ref.repository, Listed(ref.digest, ref.digest)))
            elif ref.tag:
                await queue.put((ref.repository, Listed(ref.tag)))
            else:
                await listing_of(ref.repository)
        if all_repositories:
            try:
                async for repository in self.registry.repositories():
                    await listing_of(repository)
            except RegistryError as exc:
                # registry.k8s.io refuses the catalog; others list it only to
                # clients with credentials.
                self.progress.image_failed(
                    "the catalog", f"{exc}; a registry that does not list its repositories needs "
                    "them named, one a line, in --repositories-file")

    async def _worker(self, queue: asyncio.Queue[tuple[str, Listed] | None]) -> None:
        while (item := await queue.get()) is not None:
            repository, entry = item
            what = image_name(repository, entry.reference)
            try:
                await self._mirror_image(repository, entry)
            except RegistryError as exc:
                self.progress.image_failed(what, exc)
            except Exception as exc:  # noqa: BLE001 - one image must not stop the run
                log.debug("image %s", what, exc_info=True)
                self.progress.image_failed(what, f"{type(exc).__name__}: {exc}")

    async def _mirror_image(self, repository: str, entry: Listed) -> None:
        reference = entry.reference
        digest = entry.digest
        if digest is None:
            digest = reference if is_digest(reference) else await self.registry.resolve(repository, reference)
        image = f"{repository}@{digest}"
        if image in self._seen_images:  # another tag of the same image
            return
        self._seen_images.add(image)
        pending = [i for i, done in enumerate(self._done) if image not in done]
        if not pending:
            self.progress.image_already_done()
            return
        walk = _Walk()
        await self._walk(repository, digest, walk, depth=0)
        # An index's children are mirrored with it: listed again as untagged
        # manifests (the map lists them), they are skipped.
        self._seen_images.update(f"{repository}@{child}" for child in walk.children)
        for what in walk.unsupported:
            self.progress.unsupported(image_name(repository, reference), what)
        results: list[BlobResult] = await asyncio.gather(
            *(self.copier.ensure(repository, blob) for blob in walk.blobs.values())
        )
        if walk.unsupported or any(r.error for r in results):
            # Not done: the next run looks at this image again.
            return
        complete = [i for i in pending if all(i in r.present for r in results)]
        if not self.dry_run:
            records = [(digest, _done_record(repository, reference, digest, walk))]
            for child in dict.fromkeys(walk.children):
                records.append((child, await self._child_record(repository, reference, digest, child)))
            for i in complete:
                for marked, record in records:
                    name = f"{repository}@{marked}"
                    if name not in self._done[i]:
                        await self._run(self.stores[i].mark_done, repository, marked, record)
                        self._done[i].add(name)
        self.progress.image_mirrored(image_name(repository, reference), len(walk.blobs))

    async def _child_record(self, repository: str, reference: str, parent: str, child: str) -> dict[str, Any]:
        """The done record of an index's child: its own walk, from the manifests already parsed."""
        walk = _Walk()
        await self._walk(repository, child, walk, depth=1)
        return {**_done_record(repository, reference, child, walk), "index": parent}

    async def _walk(self, repository: str, digest: str, walk: _Walk, depth: int) -> None:
        manifest = self._manifests.get(digest)
        if manifest is None:
            body, content_type, _ = await self.registry.manifest(repository, digest)
            manifest = parse_manifest(body, content_type)
            self._manifests[digest] = manifest
        walk.manifests += 1
        if manifest.kind == IMAGE:
            for blob in manifest.blobs:
                walk.blobs.setdefault(blob.digest, blob)
        elif manifest.kind == INDEX:
            if depth >= MAX_INDEX_DEPTH:
                raise RegistryError(f"{repository}@{digest}: indexes nested deeper than {MAX_INDEX_DEPTH}")
            for child in manifest.children:
                walk.children.append(child.digest)
                await self._walk(repository, child.digest, walk, depth + 1)
        else:
            walk.unsupported.append(f"{manifest.media_type} ({digest})")

    def _run(self, func: Callable[..., T], *args: Any) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(self.executor, func, *args)


def image_name(repository: str, reference: str) -> str:
    """`repo:tag` or `repo@digest`, as the operator would write it."""
    return f"{repository}{'@' if is_digest(reference) else ':'}{reference}"


def _done_record(repository: str, reference: str, digest: str, walk: _Walk) -> dict[str, Any]:
    return {
        "repository": repository,
        "reference": reference,
        "digest": digest,
        "manifests": walk.manifests,
        "blobs": sorted(walk.blobs),
        "bytes": sum(b.size for b in walk.blobs.values()),
        "mirrored_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
