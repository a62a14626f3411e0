"""One mirror run: from image references to blobs in buckets and done markers.

The walk, for each repository (or the whole catalog):

1. list its tags (paginated), or take the one tag or digest given;
2. resolve each tag to its manifest digest with a HEAD;
3. skip the image if every bucket holds its done marker
   (`archeio-mirror/done/<repo>@<digest>`): no manifest is fetched;
4. otherwise fetch the manifest; an index leads to its child manifests, an
   image to its config and layer blobs; schema 1 and unknown types are
   reported and left alone;
5. make sure every blob is in every bucket (`BlobCopier`);
6. write the done marker into each bucket that now holds every blob.

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
        queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(maxsize=self.concurrency * 4)
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

    async def _produce(self, queue: asyncio.Queue[tuple[str, str] | None], refs: Iterable[ImageRef],
                       all_repositories: bool) -> None:
        async def tags_of(repository: str) -> None:
            try:
                async for tag in self.registry.tags(repository):
                    await queue.put((repository, tag))
            except RegistryError as exc:
                self.progress.image_failed(f"{repository} (listing tags)", exc)

        for ref in refs:
            if ref.digest or ref.tag:
                await queue.put((ref.repository, ref.digest or ref.tag or ""))
            else:
                await tags_of(ref.repository)
        if all_repositories:
            try:
                async for repository in self.registry.repositories():
                    await tags_of(repository)
            except RegistryError as exc:
                self.progress.image_failed("the catalog", exc)

    async def _worker(self, queue: asyncio.Queue[tuple[str, str] | None]) -> None:
        while (item := await queue.get()) is not None:
            repository, reference = item
            try:
                await self._mirror_image(repository, reference)
            except RegistryError as exc:
                self.progress.image_failed(f"{repository}:{reference}", exc)
            except Exception as exc:  # noqa: BLE001 - one image must not stop the run
                log.debug("image %s:%s", repository, reference, exc_info=True)
                self.progress.image_failed(f"{repository}:{reference}", f"{type(exc).__name__}: {exc}")

    async def _mirror_image(self, repository: str, reference: str) -> None:
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
        for what in walk.unsupported:
            self.progress.unsupported(f"{repository}:{reference}", what)
        results: list[BlobResult] = await asyncio.gather(
            *(self.copier.ensure(repository, blob) for blob in walk.blobs.values())
        )
        if walk.unsupported or any(r.error for r in results):
            # Not done: the next run looks at this image again.
            return
        complete = [i for i in pending if all(i in r.present for r in results)]
        if not self.dry_run:
            record = _done_record(repository, reference, digest, walk)
            for i in complete:
                await self._run(self.stores[i].mark_done, repository, digest, record)
                self._done[i].add(image)
        self.progress.image_mirrored(f"{repository}:{reference}", len(walk.blobs))

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
                await self._walk(repository, child.digest, walk, depth + 1)
        else:
            walk.unsupported.append(f"{manifest.media_type} ({digest})")

    def _run(self, func: Callable[..., T], *args: Any) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(self.executor, func, *args)


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
