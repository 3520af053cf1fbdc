"""The shm path end to end: between two real processes, plus its faults and its fallback.

The producer runs in a spawned process (transport_workers.ExporterProcess) with a fake clock; the
expected tensors are regenerated here from the same seeds, never taken from the producer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from multiprocessing.shared_memory import SharedMemory

import pytest
import torch
from prometheus_client import CollectorRegistry
from transport_workers import ExporterProcess, seeded_embedding

from encoder_service.transport import (
    DescriptorError,
    EmbeddingExporter,
    EmbeddingImporter,
    EmbeddingKey,
    EmbeddingLocation,
    ExporterConfig,
    HostIdentity,
    ImporterConfig,
    PoolUnavailableError,
    StaleSlotError,
    TransportCollector,
    TransportError,
    grpc_status,
)
from encoder_service.transport.metrics import POOL_FALLBACKS_TOTAL, POOLS_OPEN

ROWS, HIDDEN = 16, 128  # 4 KiB in bf16: one block
CONFIG = {"pool_bytes": 16 * 4096, "block_bytes": 4096, "ttl_s": 30.0}


@pytest.fixture(scope="module")
def producer_process():
    proc = ExporterProcess(CONFIG)
    yield proc
    proc.stop()


@pytest.fixture
def producer(producer_process):
    # Every test starts from an empty pool: age everything out.
    producer_process.call("advance", 1e6)
    producer_process.call("sweep")
    return producer_process


def _loc(d: dict) -> EmbeddingLocation:
    return EmbeddingLocation.from_dict(d)


def _pipe_stream(proc: ExporterProcess):
    return lambda loc: proc.call("stream", loc.embedding_id, 1024)


def test_shm_between_processes_is_bit_exact_with_the_pool_opened_once(producer):
    with EmbeddingImporter() as importer:
        for seed in range(5):
            loc = _loc(producer.call("put", ROWS, HIDDEN, seed, 1))
            assert loc.path == "shm"
            got = asyncio.run(importer.fetch(loc))
            assert torch.equal(got, seeded_embedding(ROWS, HIDDEN, seed))
            assert producer.call("ack", loc.embedding_id, "rank0") == (True, True)
        assert importer.stats.fetches["shm"] == 5
        assert importer.stats.gauges[POOLS_OPEN]() == 1


def test_concurrent_transfers_land_in_the_right_requests(producer):
    shapes = [(ROWS * (1 + i % 3), HIDDEN) for i in range(8)]
    locs = [_loc(producer.call("put", r, h, 100 + i, 1)) for i, (r, h) in enumerate(shapes)]
    order = list(range(len(locs)))
    random.Random(0).shuffle(order)

    async def run(importer):
        return await asyncio.gather(*(importer.fetch(locs[i]) for i in order))

    with EmbeddingImporter() as importer:
        results = asyncio.run(run(importer))
    for i, got in zip(order, results, strict=True):
        assert torch.equal(got, seeded_embedding(*shapes[i], 100 + i))


def test_full_pool_falls_back_to_grpc_stream_and_ttl_recycles(producer):
    locs = [_loc(producer.call("put", ROWS, HIDDEN, s, 1)) for s in range(20)]  # nobody acks
    paths = [loc.path for loc in locs]
    assert paths == ["shm"] * 16 + ["grpc_stream"] * 4
    assert producer.call("stats")["pool_fallbacks"] >= 4
    with EmbeddingImporter() as importer:
        for s in (0, 17):  # one pooled, one spilled: both readable
            got = asyncio.run(importer.fetch(locs[s], _pipe_stream(producer)))
            assert torch.equal(got, seeded_embedding(ROWS, HIDDEN, s))
        # The consumer never acks: after the TTL the pool takes new items again...
        producer.call("advance", CONFIG["ttl_s"] + 1)
        fresh = _loc(producer.call("put", ROWS, HIDDEN, 99, 1))
        assert fresh.path == "shm"
        # ...and the old descriptors read as stale instead of as someone else's bytes.
        with pytest.raises(StaleSlotError):
            asyncio.run(importer.fetch(locs[fresh.key.slot_id]))
        assert torch.equal(asyncio.run(importer.fetch(fresh)), seeded_embedding(ROWS, HIDDEN, 99))


def test_encoder_that_died_after_replying_fails_the_request_unavailable():
    proc = ExporterProcess(CONFIG)
    try:
        first = _loc(proc.call("put", ROWS, HIDDEN, 1, 1))
        second = _loc(proc.call("put", ROWS, HIDDEN, 2, 1))
        with EmbeddingImporter() as importer:
            asyncio.run(importer.fetch(first))  # pool now opened and cached
            proc.process.kill()
            proc.process.join(timeout=30)
            with pytest.raises(PoolUnavailableError) as err:
                asyncio.run(importer.fetch(second))
            assert grpc_status(err.value).name == "UNAVAILABLE"
            assert importer.stats.errors["PoolUnavailableError"] == 1
    finally:
        proc.stop()
        try:  # the killed owner could not unlink its pool
            SharedMemory(name=first.key.pool_id).unlink()
        except FileNotFoundError:
            pass


# -- in one process: faults that need precise control over the pool -------------------------


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def local():
    clock = Clock()
    cfg = ExporterConfig(pool_bytes=4 * 4096, block_bytes=4096, ttl_s=10.0, chunk_bytes=1024)
    exporter = EmbeddingExporter(cfg, clock=clock)
    importer = EmbeddingImporter()
    yield exporter, importer, clock
    importer.close()
    exporter.close()


def _stream_from(exporter):
    return lambda loc: exporter.stream_chunks(loc.embedding_id, 1024)


def test_acked_slot_reads_as_data_loss_not_as_garbage(local):
    exporter, importer, _ = local
    loc = exporter.put(seeded_embedding(ROWS, HIDDEN, 1))
    exporter.ack(loc)
    exporter.put(seeded_embedding(ROWS, HIDDEN, 2))  # reuses the same slot
    with pytest.raises(StaleSlotError) as err:
        asyncio.run(importer.fetch(loc))
    assert grpc_status(err.value).name == "DATA_LOSS"
    with pytest.raises(StaleSlotError):  # and over the stream too
        asyncio.run(
            importer.fetch(dataclasses.replace(loc, path="grpc_stream"), _stream_from(exporter))
        )


@pytest.mark.parametrize(
    "tamper",
    [
        lambda loc: dataclasses.replace(loc, offset=loc.offset + 4096),  # not its slot
        lambda loc: dataclasses.replace(
            loc, key=EmbeddingKey(loc.key.pool_id, 40, loc.key.generation), offset=40 * 4096
        ),  # past the end
        lambda loc: dataclasses.replace(loc, shape=(ROWS * 3, HIDDEN), nbytes=loc.nbytes * 3),
        lambda loc: dataclasses.replace(loc, shape=(ROWS * 9, HIDDEN), nbytes=loc.nbytes * 9),
    ],
)
def test_descriptor_outside_its_slot_or_pool_is_rejected(local, tamper):
    exporter, importer, _ = local
    loc = exporter.put(seeded_embedding(ROWS, HIDDEN, 1))
    with pytest.raises(DescriptorError) as err:
        asyncio.run(importer.fetch(tamper(loc)))
    assert grpc_status(err.value).name == "DATA_LOSS"
    # The importer keeps serving the intact descriptor.
    assert torch.equal(asyncio.run(importer.fetch(loc)), seeded_embedding(ROWS, HIDDEN, 1))


def test_slot_expiring_mid_stream_aborts_the_stream(local):
    exporter, _, clock = local
    loc = exporter.put(seeded_embedding(ROWS, HIDDEN, 1))
    chunks = exporter.stream_chunks(loc.embedding_id, 1024)
    next(chunks)
    clock.now = 11.0
    exporter.sweep_expired()
    exporter.put(seeded_embedding(ROWS, HIDDEN, 2))
    with pytest.raises(StaleSlotError):
        next(chunks)


def test_pool_full_fallback_is_counted_in_metrics(local):
    exporter, importer, _ = local
    locs = [exporter.put(seeded_embedding(ROWS, HIDDEN, s)) for s in range(6)]
    assert [loc.path for loc in locs].count("grpc_stream") == 2
    got = asyncio.run(importer.fetch(locs[5], _stream_from(exporter)))
    assert torch.equal(got, seeded_embedding(ROWS, HIDDEN, 5))
    registry = CollectorRegistry()
    registry.register(TransportCollector("encoder", [exporter.stats]))
    assert registry.get_sample_value(POOL_FALLBACKS_TOTAL, {"role": "encoder"}) == 2.0
    # A spilled item is freed by its ack like a pooled one.
    assert exporter.ack(locs[5]).released
    with pytest.raises(StaleSlotError):
        asyncio.run(importer.fetch(locs[5], _stream_from(exporter)))


def test_closed_pool_is_unavailable(local):
    exporter, importer, _ = local
    loc = exporter.put(seeded_embedding(ROWS, HIDDEN, 1))
    asyncio.run(importer.fetch(loc))
    exporter.close()
    with pytest.raises(TransportError) as err:
        asyncio.run(importer.fetch(loc))
    assert grpc_status(err.value).name == "UNAVAILABLE"


def test_path_follows_host_identity_and_the_force_flag(local):
    exporter, _, _ = local
    loc = exporter.put(seeded_embedding(ROWS, HIDDEN, 3))
    elsewhere = EmbeddingImporter(host=HostIdentity(boot_id="other", hostname="other-node"))
    forced = EmbeddingImporter(ImporterConfig(force_path="grpc_stream"))
    trusting = EmbeddingImporter(
        ImporterConfig(force_path="shm"), host=HostIdentity(boot_id="x", hostname="y")
    )
    for importer, path in ((elsewhere, "grpc_stream"), (forced, "grpc_stream"), (trusting, "shm")):
        with importer:
            got = asyncio.run(importer.fetch(loc, _stream_from(exporter)))
            assert torch.equal(got, seeded_embedding(ROWS, HIDDEN, 3))
            assert dict(importer.stats.fetches) == {path: 1}


def test_pool_this_process_cannot_open_falls_back_to_the_stream_once_counted():
    # A cuda_ipc pool seen from a process without CUDA: the handle cannot be opened, so the
    # importer streams instead, remembers the pool as unopenable, and counts the fallbacks.
    from encoder_service.transport.control_block import ControlBlock
    from encoder_service.transport.host import local_host
    from encoder_service.transport.stream import split_chunks

    if torch.cuda.is_available():
        pytest.skip("needs a process without CUDA")
    expected = seeded_embedding(ROWS, HIDDEN, 11)
    meta = {"kind": "cuda_ipc", "block_bytes": 4096, "owner_pid": 0, "pid_ns": "unknown"}
    meta.update(host_id=local_host().key, ipc={"library": "torch"})
    control = ControlBlock.create("glimpse-test-nocuda", meta, 4, 4 * 4096, with_data=False)
    try:
        loc = EmbeddingLocation(
            path="cuda_ipc",
            key=EmbeddingKey("glimpse-test-nocuda", 0, 5),
            host=local_host(),
            offset=0,
            nbytes=expected.numel() * 2,
            dtype="bfloat16",
            shape=tuple(expected.shape),
        )
        data = expected.view(torch.uint8).numpy().tobytes()
        with EmbeddingImporter() as importer:
            for _ in range(2):
                got = asyncio.run(importer.fetch(loc, lambda _loc: split_chunks(data, 1024)))
                assert torch.equal(got, expected)
            assert importer.stats.open_fallbacks == 2
            assert dict(importer.stats.fetches) == {"grpc_stream": 2}
    finally:
        control.close()
