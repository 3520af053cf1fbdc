"""Embedding cache (LRU by bytes), embedding store (pool, fallback, acks, TTL, capacity), batcher."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Iterator

import pytest
import torch

import encoder_service.store as store_module
from encoder_service.batcher import VisionBatcher
from encoder_service.cache import EmbeddingCache
from encoder_service.errors import EncodeError, ErrorKind
from encoder_service.items import EncodedItem, Modality
from encoder_service.store import EmbeddingStore
from encoder_service.transport import ExporterConfig, HostIdentity
from encoder_service.transport.metrics import POOL_CAPACITY_BYTES


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


BLOCK = 4096


@contextlib.contextmanager
def make_store(
    pool_blocks: int = 16,
    spill_bytes: int = 1 << 20,
    ttl_s: float = 30,
    transport: str = "auto",
    clock=None,
) -> Iterator[EmbeddingStore]:
    config = ExporterConfig(pool_bytes=pool_blocks * BLOCK, block_bytes=BLOCK, ttl_s=ttl_s)
    kwargs = {"clock": clock} if clock is not None else {}
    store = EmbeddingStore(config, spill_bytes, "cpu", transport, **kwargs)
    try:
        yield store
    finally:
        store.close()


def streamed(store: EmbeddingStore, embedding_id: str, like: torch.Tensor) -> torch.Tensor:
    raw = b"".join(c.data for c in store.stream(embedding_id, 1024))
    return torch.frombuffer(bytearray(raw), dtype=like.dtype).view(like.shape)


def not_found(store: EmbeddingStore, embedding_id: str) -> bool:
    with pytest.raises(EncodeError) as info:
        list(store.stream(embedding_id))
    return info.value.kind is ErrorKind.NOT_FOUND


def test_store_frees_after_all_consumers_ack():
    with make_store() as store:
        emb = torch.randn(5, 8, dtype=torch.bfloat16)
        [loc] = store.put_all([emb], consumers=2)
        assert loc.path == "shm" and store.used_bytes == BLOCK
        assert torch.equal(streamed(store, loc.embedding_id, emb), emb)
        assert store.ack([loc.embedding_id]) == (1, 0)  # one of two consumers
        assert store.ack([loc.embedding_id, "unknown", "pool:1:1"]) == (1, 1)
        assert not_found(store, loc.embedding_id)
        assert store.used_bytes == 0


def test_named_consumer_acks_count_once():
    with make_store() as store:
        [loc] = store.put_all([torch.zeros(4, 4)], consumers=2)
        assert store.ack([loc.embedding_id], consumer="rank0") == (1, 0)
        assert store.ack([loc.embedding_id], consumer="rank0") == (1, 0)  # a retry
        assert store.ack([loc.embedding_id], consumer="rank1") == (1, 1)


def test_store_ttl_frees_unacknowledged_embeddings():
    clock = FakeClock()
    with make_store(ttl_s=10, clock=clock) as store:
        [first] = store.put_all([torch.zeros(4, 4)])
        clock.now += 6
        [second] = store.put_all([torch.ones(4, 4)])
        clock.now += 5  # first is 11 s old, second 5 s
        assert store.sweep() == 1
        assert not_found(store, first.embedding_id)
        assert torch.equal(streamed(store, second.embedding_id, torch.ones(4, 4)), torch.ones(4, 4))
        assert store.used_bytes == BLOCK


def test_full_pool_falls_back_to_stream_without_error():
    with make_store(pool_blocks=2) as store:
        embs = [torch.full((4, 4), float(i)) for i in range(3)]
        locs = store.put_all(embs)
        assert [loc.path for loc in locs] == ["shm", "shm", "grpc_stream"]
        assert store.stats.pool_fallbacks == 1
        for emb, loc in zip(embs, locs, strict=True):
            assert torch.equal(streamed(store, loc.embedding_id, emb), emb)
        store.ack([loc.embedding_id for loc in locs])
        assert [loc.path for loc in store.put_all(embs[:1])] == ["shm"]  # slots came back


def test_reader_on_another_host_gets_stream_and_holds_no_pool_space():
    with make_store() as store:
        remote = HostIdentity(boot_id="other-boot", hostname="elsewhere")
        [loc] = store.put_all([torch.zeros(4, 4)], consumer_host=remote)
        assert loc.path == "grpc_stream" and store.stats.pool_fallbacks == 0
        [local] = store.put_all([torch.zeros(4, 4)], consumer_host=store.host)
        assert local.path == "shm"


def test_store_refuses_beyond_capacity_and_recovers_after_ack():
    with make_store(spill_bytes=1000, transport="grpc_stream") as store:
        assert store.pool_path is None
        held = store.put_all([torch.zeros(100), torch.zeros(100)])  # 800 bytes
        with pytest.raises(EncodeError) as info:
            store.put_all([torch.zeros(100)])
        assert info.value.kind is ErrorKind.EXHAUSTED
        assert store.used_bytes == 800  # the refused request stored nothing
        store.ack([held[0].embedding_id])
        store.put_all([torch.zeros(100)])


def test_refused_request_gives_back_its_pool_slots():
    with make_store(pool_blocks=1, spill_bytes=1000) as store:
        items = [torch.zeros(100), torch.zeros(100), torch.zeros(200)]  # pool, spill, too much
        with pytest.raises(EncodeError):
            store.put_all(items)
        assert store.used_bytes == 0
        assert store.put_all(items[:1])[0].path == "shm"


def test_cuda_ipc_transport_is_refused_on_a_cpu_device():
    with pytest.raises(ValueError, match="cuda_ipc"), make_store(transport="cuda_ipc"):
        pass


def test_pool_shrinks_to_fit_a_small_dev_shm(monkeypatch):
    usage = shutil.disk_usage("/dev/shm")
    monkeypatch.setattr(
        store_module.shutil, "disk_usage", lambda path: usage._replace(free=8 * BLOCK)
    )
    with make_store(pool_blocks=64) as store:
        assert store.stats.gauges[POOL_CAPACITY_BYTES]() == 4 * BLOCK


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
