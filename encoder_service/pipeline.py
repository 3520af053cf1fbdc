"""The encode pipeline: media item -> bytes -> decoded, preprocessed input -> embedding.

Contract: ``await EncodePipeline.encode(items, timeout_s)`` returns one ``EncodedItem`` per item in
order, or raises ``EncodeError`` naming the first failing item (siblings are cancelled). Per item:
fetch the bytes and decode/preprocess them on a worker thread (at most
``mm_max_concurrent_calls`` items at once; more wait in line, none are dropped), look the item up
in the embedding cache (by raw bytes, then by decoded content), and otherwise hand it to the
batcher. Items with the same content hash (decoded content + processing parameters) that are
being encoded at the same moment share one tower run: later arrivals wait for the first one's
result, and a failure reaches every waiter as the same error (the next arrival starts afresh).
The shared run is abandoned only when every caller waiting for it has given up. The whole call
is bounded by ``timeout_s``.
gRPC, protos and where finished embeddings are kept do not belong here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time

from encoder_service.batcher import VisionBatcher
from encoder_service.cache import EmbeddingCache
from encoder_service.config import EncoderConfig
from encoder_service.errors import EncodeError, timeout
from encoder_service.items import EncodedItem, MediaItem
from encoder_service.media.decode import MediaPreparer, PreparedMedia
from encoder_service.media.fetch import load_media_bytes
from encoder_service.metrics import EncoderMetrics


class _SharedRun:
    """One tower run for a content hash and how many callers are waiting for it."""

    def __init__(self, task: asyncio.Task[EncodedItem]) -> None:
        self.task = task
        self.waiters = 0


class EncodePipeline:
    def __init__(
        self,
        config: EncoderConfig,
        preparer: MediaPreparer,
        batcher: VisionBatcher,
        cache: EmbeddingCache,
        metrics: EncoderMetrics,
    ) -> None:
        self._config = config
        self._preparer = preparer
        self._batcher = batcher
        self._cache = cache
        self._metrics = metrics
        workers = config.batch.mm_max_concurrent_calls
        self._slots = asyncio.Semaphore(workers)
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="media")
        self._running: dict[str, _SharedRun] = {}  # content hash -> the run in progress
        self.tower_runs = 0  # items handed to the batcher (shared runs count once)

    async def close(self) -> None:
        await self._batcher.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def encode(
        self, items: list[MediaItem], timeout_s: float, use_cache: bool = True
    ) -> list[EncodedItem]:
        tasks = [asyncio.create_task(self._encode_one(item, use_cache)) for item in items]
        try:
            await asyncio.wait(tasks, timeout=timeout_s, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:  # in request order: the first failed item names the error
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            for item, task in zip(items, tasks, strict=True):
                if not task.done():
                    raise timeout(
                        f"request did not finish within {timeout_s:.1f}s waiting for {item.label}"
                    )
            return [task.result() for task in tasks]
        finally:
            for task in tasks:
                task.cancel()

    async def _encode_one(self, item: MediaItem, use_cache: bool) -> EncodedItem:
        start = time.monotonic()
        self._metrics.inflight.inc()
        try:
            result = await self._produce(item, use_cache)
        except EncodeError as err:
            self._metrics.item_errors.labels(reason=err.kind.value).inc()
            raise err.for_item(item.label) from None
        finally:
            self._metrics.inflight.dec()
        self._metrics.items.labels(modality=item.modality.value).inc()
        self._metrics.encode_latency.labels(modality=item.modality.value).observe(
            time.monotonic() - start
        )
        return result

    def _fetch(self, item: MediaItem, with_key: bool) -> tuple[bytes, str | None]:
        """Worker thread: the item's bytes and, when caching, their source key."""
        data = load_media_bytes(item, self._config.media)
        return data, self._preparer.source_key(item, data) if with_key else None

    async def _produce(self, item: MediaItem, use_cache: bool) -> EncodedItem:
        loop = asyncio.get_running_loop()
        # sharing a concurrent run keeps nothing in memory, so it works with the cache disabled;
        # only a caller that opts out of reuse altogether (warm-up) runs the tower on its own
        share = use_cache
        use_cache = use_cache and self._cache.enabled
        async with self._slots:
            fetch_start = time.monotonic()
            data, key = await loop.run_in_executor(self._pool, self._fetch, item, use_cache)
            self._metrics.fetch_seconds.observe(time.monotonic() - fetch_start)
            if key is not None:
                self._metrics.cache_queries.inc()
                hit = self._cache.lookup_source(key)
                if hit is not None and hit.modality is item.modality:
                    self._metrics.cache_hits.inc()
                    return hit
            prepared = await loop.run_in_executor(self._pool, self._preparer.prepare, item, data)
        if use_cache:
            hit = self._cache.get(prepared.content_hash)
            if hit is not None:
                self._metrics.cache_hits.inc()
                self._cache.put(hit, key)
                return hit
        if not share:
            return await self._run_tower(item, prepared)
        run = self._running.get(prepared.content_hash)
        leader = run is None
        if run is None:
            run = self._start_shared(item, prepared)
        result = await self._wait_shared(run, prepared.content_hash)
        if not leader:  # reused, not computed: reported like a cache hit
            if use_cache:
                self._metrics.cache_hits.inc()
            result = dataclasses.replace(result, cache_hit=True)
        if use_cache:
            self._cache.put(result, key)
        return result

    def _start_shared(self, item: MediaItem, prepared: PreparedMedia) -> _SharedRun:
        run = _SharedRun(asyncio.ensure_future(self._run_tower(item, prepared)))
        self._running[prepared.content_hash] = run
        run.task.add_done_callback(lambda _: self._forget(prepared.content_hash, run))
        return run

    def _forget(self, content_hash: str, run: _SharedRun) -> None:
        if self._running.get(content_hash) is run:
            del self._running[content_hash]

    async def _wait_shared(self, run: _SharedRun, content_hash: str) -> EncodedItem:
        run.waiters += 1
        try:
            # shield: one caller giving up (its deadline, a failed sibling) must not cancel the
            # run the others are waiting for
            return await asyncio.shield(run.task)
        finally:
            run.waiters -= 1
            if run.waiters == 0 and not run.task.done():
                # nobody wants it any more: let the batcher drop the job. Forgotten now, not
                # when the cancellation lands, so a newcomer starts its own run instead of
                # joining one that is being cancelled.
                self._forget(content_hash, run)
                run.task.cancel()
            elif run.task.done() and not run.task.cancelled():
                run.task.exception()  # retrieved: no "never retrieved" warning for a failure

    async def _run_tower(self, item: MediaItem, prepared: PreparedMedia) -> EncodedItem:
        vision = prepared.vision
        self.tower_runs += 1
        embedding = await self._batcher.encode(vision.pixel_values, vision.grid_thw)
        return EncodedItem(
            content_hash=prepared.content_hash,
            modality=item.modality,
            embedding=embedding,
            grid_thw=vision.grid_thw,
            timestamps=tuple(float(t) for t in vision.timestamps),
            cache_hit=False,
        )
