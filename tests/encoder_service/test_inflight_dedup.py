"""Identical items encoded at the same moment share one vision tower run.

The pipeline runs in-process with the real media preparer (hashing, decoding, preprocessing) and
a stand-in tower that pools each 2x2 merge block and holds its first forward until every request
has arrived, so all of them are in flight together.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time

import pytest
import torch
from PIL import Image

from encoder_service.batcher import VisionBatcher
from encoder_service.cache import EmbeddingCache
from encoder_service.config import EncoderConfig, MediaLimits
from encoder_service.items import MediaItem, Modality
from encoder_service.media.decode import MediaPreparer
from encoder_service.metrics import EncoderMetrics
from encoder_service.pipeline import EncodePipeline
from models.glm4v.processing.processor_config import ProcessorConfig

N = 6


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, format="PNG")
    return buf.getvalue()


class GatedTower:
    """Counts the items it encodes; each forward waits for ``gate`` (bounded)."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.items = 0
        self.fail_next = False

    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        self.entered.set()
        assert self.gate.wait(10.0), "test never released the tower"
        self.items += int(grid_thw.shape[0])
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("tower failed")
        # [N, patch_dim] -> [N / 4, patch_dim]: a deterministic function of the pixels
        return pixel_values.view(-1, 4, pixel_values.shape[-1]).mean(dim=1)


async def run_together(pipeline, tower, items):
    """Encode each item as its own request, all at once; release the tower once all wait."""
    tower.gate.clear()
    tower.entered.clear()
    calls = [asyncio.ensure_future(pipeline.encode([it], 30.0)) for it in items]
    deadline = time.monotonic() + 10.0
    while not tower.entered.is_set():  # the first forward has started and is held
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.3)  # the other requests finish decoding and join meanwhile
    tower.gate.set()
    return await asyncio.gather(*calls, return_exceptions=True)


@pytest.mark.parametrize("cache_mb", [0, 64])
def test_concurrent_identical_items_run_the_tower_once(cache_mb):
    async def main():
        tower = GatedTower()
        batcher = VisionBatcher(tower, max_batch_patches=1 << 16)
        batcher.start()
        preparer = MediaPreparer(ProcessorConfig(), MediaLimits(), salt=b"s" * 32)
        cache = EmbeddingCache(cache_mb << 20)
        pipeline = EncodePipeline(EncoderConfig(), preparer, batcher, cache, EncoderMetrics())
        try:
            same = png((200, 30, 30))
            results = await run_together(
                pipeline, tower, [MediaItem(0, Modality.IMAGE, data=same) for _ in range(N)]
            )
            first_runs = tower.items
            # a different image is not merged with them
            other = await run_together(
                pipeline, tower, [MediaItem(0, Modality.IMAGE, data=png((0, 90, 200)))]
            )
            return results, first_runs, tower.items, other
        finally:
            await pipeline.close()

    results, first_runs, total_runs, other = asyncio.run(main())
    encoded = [r[0] for r in results]
    assert first_runs == 1, f"{N} identical concurrent items ran the tower {first_runs} times"
    assert total_runs == 2
    assert sum(not e.cache_hit for e in encoded) == 1  # one computed, the rest reused
    for e in encoded[1:]:
        assert e.content_hash == encoded[0].content_hash
        assert torch.equal(e.embedding, encoded[0].embedding)
    assert not torch.equal(other[0][0].embedding[:1], encoded[0].embedding[:1])


def test_a_failed_shared_run_fails_every_waiter_and_the_next_request_retries():
    async def main():
        tower = GatedTower()
        batcher = VisionBatcher(tower, max_batch_patches=1 << 16)
        batcher.start()
        preparer = MediaPreparer(ProcessorConfig(), MediaLimits(), salt=b"s" * 32)
        pipeline = EncodePipeline(
            EncoderConfig(), preparer, batcher, EmbeddingCache(64 << 20), EncoderMetrics()
        )
        try:
            items = [MediaItem(0, Modality.IMAGE, data=png((10, 160, 10))) for _ in range(N)]
            tower.fail_next = True
            failed = await run_together(pipeline, tower, items)
            runs_after_failure = tower.items
            retried = await run_together(pipeline, tower, items[:1])
            return failed, runs_after_failure, retried, tower.items
        finally:
            await pipeline.close()

    failed, runs_after_failure, retried, total_runs = asyncio.run(main())
    assert runs_after_failure == 1
    assert all(isinstance(f, RuntimeError) for f in failed), failed
    assert all(f is failed[0] for f in failed)  # the same error, not N separate runs
    assert total_runs == 2  # the failure was not remembered: the next request ran the tower
    assert not retried[0][0].cache_hit and retried[0][0].embedding.shape[0] > 0


def test_a_run_every_caller_gave_up_on_does_not_trap_a_newcomer():
    async def main():
        tower = GatedTower()
        batcher = VisionBatcher(tower, max_batch_patches=1 << 16)
        batcher.start()
        preparer = MediaPreparer(ProcessorConfig(), MediaLimits(), salt=b"s" * 32)
        pipeline = EncodePipeline(
            EncoderConfig(), preparer, batcher, EmbeddingCache(64 << 20), EncoderMetrics()
        )
        try:
            item = MediaItem(0, Modality.IMAGE, data=png((90, 90, 10)))
            tower.gate.clear()
            first = asyncio.ensure_future(pipeline.encode([item], 30.0))
            deadline = time.monotonic() + 10.0
            while not tower.entered.is_set():  # its forward is running (and held)
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            first.cancel()  # the only caller gives up (client gone)
            with pytest.raises(asyncio.CancelledError):
                await first
            late = asyncio.ensure_future(pipeline.encode([item], 30.0))
            await asyncio.sleep(0.3)  # the newcomer decodes and queues its own run
            tower.gate.set()
            return await late, tower.items
        finally:
            tower.gate.set()
            await pipeline.close()

    late, total_runs = asyncio.run(main())
    assert not late[0].cache_hit and late[0].embedding.shape[0] > 0
    assert total_runs == 2  # the abandoned forward finished unused; the newcomer ran its own
