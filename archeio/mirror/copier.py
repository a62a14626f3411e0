"""Copy one blob from the source registry into every bucket that lacks it.

The blob is read once and streamed to all buckets at the same time, part by
part, so memory holds at most two parts per blob in flight (the one being
uploaded and the one being read), whatever the blob's size. Its digest and
size are computed on the way and checked *before* the object becomes
visible:

- a blob no larger than one part is read whole, verified, then written with
  one PutObject carrying its SHA-256 checksum (S3 checks it again);
- a larger one is a multipart upload, which S3 shows to no reader until
  CompleteMultipartUpload; that call is made only after the digest matched,
  and the upload is aborted otherwise (or when anything else goes wrong).

So a blob at `containers/images/<digest>` always holds exactly the bytes of
`<digest>`, even after a kill -9 (an interrupted multipart upload stays
invisible; a lifecycle rule on the bucket reaps it).

Copies are shared: asking for a digest already being copied waits for that
copy instead of starting another.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from .progress import Progress
from .registry import Descriptor, DigestMismatch, RegistryClient, RegistryError, new_hasher
from .s3 import BucketStore

log = logging.getLogger("archeio.mirror")

T = TypeVar("T")
READ_CHUNK = 256 * 1024
MIN_PART_SIZE = 5 * 1024 * 1024  # S3's smallest part (but the last)
MAX_PARTS = 10_000  # S3's most parts in one upload


@dataclass(frozen=True)
class BlobResult:
    """Where a blob is after `ensure`: the buckets holding it, or why not."""

    digest: str
    present: frozenset[int]  # indexes into the copier's stores
    error: str | None = None


class BlobCopier:
    """Makes sure blobs are in every bucket; one shared copy per digest."""

    def __init__(self, registry: RegistryClient, stores: Sequence[BucketStore], executor: Executor,
                 progress: Progress, part_size: int = 8 * 1024 * 1024, dry_run: bool = False,
                 attempts: int = 3) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part size must be at least {MIN_PART_SIZE} bytes")
        self.registry = registry
        self.stores = list(stores)
        self.executor = executor
        self.progress = progress
        self.part_size = part_size
        self.dry_run = dry_run
        self.attempts = attempts
        self._copies: dict[str, asyncio.Task[BlobResult]] = {}

    async def ensure(self, repository: str, blob: Descriptor) -> BlobResult:
        """The blob in every bucket (or the reason it is not); copies at most once a run."""
        task = self._copies.get(blob.digest)
        if task is None:
            task = asyncio.ensure_future(self._ensure(repository, blob))
            self._copies[blob.digest] = task
        # A shared copy must survive one waiter being cancelled.
        return await asyncio.shield(task)

    async def _ensure(self, repository: str, blob: Descriptor) -> BlobResult:
        self.progress.found(blob.size)
        try:
            sizes = await asyncio.gather(*(self._run(s.blob_size, blob.digest) for s in self.stores))
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on
            self.progress.failed(blob.digest, f"checking the buckets: {_describe(exc)}")
            return BlobResult(blob.digest, frozenset(), _describe(exc))
        present = frozenset(i for i, size in enumerate(sizes) if size == blob.size)
        missing = [i for i in range(len(self.stores)) if i not in present]
        if not missing:
            self.progress.skipped(blob.size)
            return BlobResult(blob.digest, present)
        if self.dry_run:
            self.progress.copied(blob.digest, blob.size, len(missing))
            return BlobResult(blob.digest, present)
        targets = [self.stores[i] for i in missing]
        attempt = 0
        while True:
            attempt += 1
            moved = [0]
            try:
                await self._copy(repository, blob, targets, moved)
            except (TimeoutError, aiohttp.ClientError) as exc:
                # A stream cut mid-body: start the blob again (the registry
                # client already retried the request itself).
                self.progress.moved(-moved[0])
                if attempt < self.attempts:
                    log.info("%s: %s, copying again", blob.digest, _describe(exc))
                    await asyncio.sleep(self.registry.backoff.delay(attempt))
                    continue
                return self._failed(blob, present, exc)
            except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                self.progress.moved(-moved[0])
                return self._failed(blob, present, exc)
            self.progress.copied(blob.digest, blob.size, len(targets), in_flight=moved[0])
            return BlobResult(blob.digest, present | frozenset(missing))

    def _failed(self, blob: Descriptor, present: frozenset[int], exc: BaseException) -> BlobResult:
        self.progress.failed(blob.digest, _describe(exc))
        return BlobResult(blob.digest, present, _describe(exc))

    async def _copy(self, repository: str, blob: Descriptor, targets: list[BucketStore],
                    moved: list[int]) -> None:
        async with self.registry.blob(repository, blob.digest) as resp:
            if resp.content_length is not None and resp.content_length != blob.size:
                raise DigestMismatch(
                    f"registry sends {resp.content_length} bytes, the manifest says {blob.size}"
                )
            part_size = self._part_size_for(blob.size)
            reader = _PartReader(resp.content, blob.size, part_size, self.progress, moved)
            hasher = new_hasher(blob.digest)
            if blob.size <= reader.part_size:
                await self._put_whole(blob, targets, reader, hasher)
            else:
                await self._put_parts(blob, targets, reader, hasher)

    def _part_size_for(self, size: int) -> int:
        # Grow parts only for blobs beyond 10,000 parts (80 GB at 8 MiB).
        return max(self.part_size, -(-size // MAX_PARTS))

    async def _put_whole(self, blob: Descriptor, targets: list[BucketStore],
                         reader: _PartReader, hasher: Any) -> None:
        body = await reader.read_part()
        await reader.expect_end()
        checksum = await self._run(_hash_whole, hasher, body)
        _verify(blob, hasher, len(body))
        await asyncio.gather(*(self._run(s.put_blob, blob.digest, body, checksum) for s in targets))

    async def _put_parts(self, blob: Descriptor, targets: list[BucketStore],
                         reader: _PartReader, hasher: Any) -> None:
        uploads = await asyncio.gather(*(self._run(s.start_upload, blob.digest) for s in targets),
                                       return_exceptions=True)
        started = [(s, u) for s, u in zip(targets, uploads, strict=True) if isinstance(u, str)]
        in_flight: asyncio.Future[list[dict[str, Any]]] | None = None
        try:
            for upload in uploads:
                if isinstance(upload, BaseException):
                    raise upload
            parts: list[list[dict[str, Any]]] = [[] for _ in targets]
            number = 0
            while body := await reader.read_part():
                number += 1
                checksum = await self._run(_hash_part, hasher, body)
                if in_flight is not None:
                    for store_parts, part in zip(parts, await in_flight, strict=True):
                        store_parts.append(part)
                # Upload this part while the next one is read.
                in_flight = asyncio.gather(*(
                    self._run(s.upload_part, blob.digest, upload_id, number, body, checksum)
                    for s, upload_id in started
                ))
            if in_flight is not None:
                for store_parts, part in zip(parts, await in_flight, strict=True):
                    store_parts.append(part)
                in_flight = None
            _verify(blob, hasher, reader.total)
            await asyncio.gather(*(
                self._run(s.complete_upload, blob.digest, upload_id, store_parts)
                for (s, upload_id), store_parts in zip(started, parts, strict=True)
            ))
        except BaseException:
            await asyncio.shield(self._abort(blob.digest, started, in_flight))
            raise

    async def _abort(self, digest: str, started: list[tuple[BucketStore, str]],
                     in_flight: asyncio.Future[Any] | None) -> None:
        if in_flight is not None:
            # Let part uploads in worker threads finish before aborting, so
            # none lands after the abort and leaves a stray part behind.
            with contextlib.suppress(BaseException):
                await in_flight
        for store, upload_id in started:
            try:
                await self._run(store.abort_upload, digest, upload_id)
            except Exception as exc:  # noqa: BLE001 - invisible anyway; a lifecycle rule reaps it
                log.warning("%s: could not abort upload %s in %s: %s", digest, upload_id,
                            store.bucket, _describe(exc))

    def _run(self, func: Callable[..., T], *args: Any) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(self.executor, func, *args)


class _PartReader:
    """Cuts a response body into parts, refusing more bytes than the blob's size."""

    def __init__(self, content: aiohttp.StreamReader, size: int, part_size: int,
                 progress: Progress, moved: list[int]) -> None:
        self.content = content
        self.size = size
        self.part_size = part_size
        self.total = 0
        self._progress = progress
        self._moved = moved

    async def read_part(self) -> bytes:
        chunks: list[bytes] = []
        length = 0
        while length < self.part_size:
            # Never read past the promised size (plus the one byte that
            # shows the registry sends too much): a hostile or broken
            # source cannot make us buffer more than a part.
            want = min(READ_CHUNK, self.part_size - length, self.size + 1 - self.total)
            if want <= 0:
                break
            chunk = await self.content.read(want)
            if not chunk:
                break
            chunks.append(chunk)
            length += len(chunk)
            self.total += len(chunk)
            self._moved[0] += len(chunk)
            self._progress.moved(len(chunk))
        if self.total > self.size:
            raise DigestMismatch(f"registry sends more than the manifest's {self.size} bytes")
        return b"".join(chunks)

    async def expect_end(self) -> None:
        if self.total == self.size and await self.content.read(1):
            raise DigestMismatch(f"registry sends more than the manifest's {self.size} bytes")


def _hash_whole(hasher: Any, body: bytes) -> bytes:
    """Feed the blob hash; return the body's SHA-256 for S3's checksum."""
    hasher.update(body)
    return hasher.digest() if hasher.name == "sha256" else hashlib.sha256(body).digest()


def _hash_part(hasher: Any, body: bytes) -> bytes:
    hasher.update(body)
    return hashlib.sha256(body).digest()


def _verify(blob: Descriptor, hasher: Any, size: int) -> None:
    if size != blob.size:
        raise DigestMismatch(f"got {size} bytes, the manifest says {blob.size}")
    actual = f"{hasher.name}:{hasher.hexdigest()}"
    if actual != blob.digest:
        raise DigestMismatch(f"bytes hash to {actual}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RegistryError):
        return str(exc)
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text
