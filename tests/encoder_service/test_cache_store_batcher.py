"""Embedding cache (LRU by bytes), embedding store (acks, TTL, capacity) and the ViT batcher."""

from __future__ import annotations

import asyncio

import pytest
import torch

from encoder_service.batcher import VisionBatcher
from encoder_service.cache import EmbeddingCache
from encoder_service.errors import EncodeError, ErrorKind
from encoder_service.items import EncodedItem, Modality
from encoder_service.store import EmbeddingStore


def item(name: str, rows: int, hidden: int = 16) -> EncodedItem:
    emb = torch.full((rows, hidden), float(len(name)), dtype=torch.float32)
    return EncodedItem(name, Modality.IMAGE, emb, (1, 2, 2 * rows), (), cache_hit=False)


def test_cache_evicts_least_recently_used_by_bytes():
    one = 4 * 16 * 4  # 4 rows x 16 floats
    cache = EmbeddingCache(capacity_bytes=3 * one)
    for name in ("a", "b", "c"):
        cache.put(item(name, 4))
    assert cache.get("a") is not None  # a becomes most recent
    cache.put(item("d", 4))  # evicts b, the least recently used
    assert cache.get("b") is None
    assert all(cache.get(n) is not None for n in ("a", "c", "d"))
    assert cache.used_bytes == 3 * one
    hit = cache.get("a")
    assert hit is not None and hit.cache_hit


def test_cache_source_alias_follows_eviction():
    cache = EmbeddingCache(capacity_bytes=4 * 16 * 4)
    cache.put(item("a", 4), source_key="bytes-of-a")
    assert cache.lookup_source("bytes-of-a").content_hash == "a"
    cache.put(item("b", 4))  # a is evicted; its alias must not return stale data
    assert cache.lookup_source("bytes-of-a") is None


def test_disabled_cache_keeps_nothing():
    cache = EmbeddingCache(capacity_bytes=0)
    cache.put(item("a", 4), source_key="k")
    assert cache.get("a") is None and cache.lookup_source("k") is None


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_store_frees_after_all_consumers_ack():
    store = EmbeddingStore(capacity_bytes=1 << 20, ttl_s=30)
    emb = torch.randn(5, 8, dtype=torch.bfloat16)
    stored = store.put(emb, consumers=2)
    raw = bytes(store.read(stored.embedding_id))
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).view(5, 8), emb)
    assert store.ack([stored.embedding_id]) == (1, 0)  # one of two consumers
    assert store.ack([stored.embedding_id, "unknown"]) == (1, 1)
    with pytest.raises(EncodeError) as info:
        store.read(stored.embedding_id)
    assert info.value.kind is ErrorKind.NOT_FOUND
    assert store.used_bytes == 0


def test_store_ttl_frees_unacknowledged_embeddings():
    clock = FakeClock()
    store = EmbeddingStore(capacity_bytes=1 << 20, ttl_s=10, clock=clock)
    first = store.put(torch.zeros(4, 4))
    clock.now += 6
    second = store.put(torch.zeros(4, 4))
    clock.now += 5  # first is 11 s old, second 5 s
    assert store.sweep() == 1
    with pytest.raises(EncodeError):
        store.read(first.embedding_id)
    assert store.read(second.embedding_id).nbytes == 64


def test_store_refuses_beyond_capacity_and_recovers_after_ack():
    store = EmbeddingStore(capacity_bytes=1000, ttl_s=60)
    held = store.put_all([torch.zeros(100), torch.zeros(100)])  # 800 bytes
    with pytest.raises(EncodeError) as info:
        store.put_all([torch.zeros(100)])
    assert info.value.kind is ErrorKind.EXHAUSTED
    assert len(store) == 2  # the refused request stored nothing
    store.ack([held[0].embedding_id])
    store.put_all([torch.zeros(100)])


def pool4(pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """Stand-in tower: every 4 consecutive patches (one merge block) -> their mean."""
    return pixel_values.view(-1, 4, pixel_values.shape[-1]).mean(dim=1)


def test_batcher_packs_concurrent_jobs_and_splits_results():
    calls: list[int] = []

    def tower(pixel_values, grid_thw):
        calls.append(int(grid_thw.shape[0]))
        return pool4(pixel_values, grid_thw)

    async def main():
        batcher = VisionBatcher(tower, max_batch_patches=64)
        batcher.start()
        jobs = [torch.full((16, 3), float(i)) for i in range(8)]  # 16 patches each
        outs = await asyncio.gather(*(batcher.encode(j, (1, 4, 4)) for j in jobs))
        await batcher.stop()
        return outs, batcher.forwards

    outs, forwards = asyncio.run(main())
    for i, out in enumerate(outs):
        assert out.shape == (4, 3) and torch.all(out == i)  # each job got its own rows
    assert sum(calls) == 8 and max(calls) <= 4  # 64-patch budget = at most 4 jobs per forward
    assert forwards < 8  # concurrent jobs were packed


def test_batcher_runs_an_oversized_job_alone_and_survives_a_failed_forward():
    def tower(pixel_values, grid_thw):
        if torch.isnan(pixel_values).any():
            raise RuntimeError("bad batch")
        return pool4(pixel_values, grid_thw)

    async def main():
        batcher = VisionBatcher(tower, max_batch_patches=8)
        batcher.start()
        big = await batcher.encode(torch.ones(32, 2), (1, 4, 8))
        with pytest.raises(RuntimeError):
            await batcher.encode(torch.full((4, 2), float("nan")), (1, 2, 2))
        after = await batcher.encode(torch.zeros(4, 2), (1, 2, 2))
        await batcher.stop()
        return big, after

    big, after = asyncio.run(main())
    assert big.shape == (8, 2) and after.shape == (1, 2)
