"""The cuda_ipc path between two real processes (GPU only; skipped without CUDA).

The producer is a spawned process owning a CUDA pool on cuda:0; this process imports on cuda:0.
Expected tensors are regenerated here from the same seeds.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transport_workers import ExporterProcess, seeded_embedding

from encoder_service.transport import (
    EmbeddingImporter,
    EmbeddingLocation,
    ImporterConfig,
    StaleSlotError,
)
from encoder_service.transport.metrics import POOLS_OPEN

pytestmark = pytest.mark.gpu

HIDDEN = 4096
MIB = 1 << 20


@pytest.fixture(scope="module")
def gpu_producer():
    proc = ExporterProcess({"pool_bytes": 64 * MIB, "block_bytes": MIB, "ttl_s": 30.0}, "cuda:0")
    yield proc
    proc.stop()


def _counting_opens(importer: EmbeddingImporter) -> list:
    calls: list = []
    original = importer._open

    def counted(*args):
        calls.append(args)
        return original(*args)

    importer._open = counted  # type: ignore[method-assign]
    return calls


def test_cuda_ipc_is_bit_exact_and_opens_the_pool_once(gpu_producer):
    with EmbeddingImporter(ImporterConfig(device="cuda:0")) as importer:
        opens = _counting_opens(importer)
        for seed, rows in enumerate([1600, 256, 1, 777, 1600]):
            loc = EmbeddingLocation.from_dict(gpu_producer.call("put", rows, HIDDEN, seed, 1))
            assert loc.path == "cuda_ipc"
            got = asyncio.run(importer.fetch(loc))
            assert got.device == torch.device("cuda", 0)
            assert torch.equal(got.cpu(), seeded_embedding(rows, HIDDEN, seed))
            assert gpu_producer.call("ack", loc.embedding_id, "rank0")[1]  # released
        assert len(opens) == 1
        assert importer.stats.gauges[POOLS_OPEN]() == 1
        assert importer.stats.fetches["cuda_ipc"] == 5


def test_cuda_ipc_stale_slot_is_data_loss(gpu_producer):
    with EmbeddingImporter(ImporterConfig(device="cuda:0")) as importer:
        loc = EmbeddingLocation.from_dict(gpu_producer.call("put", 256, HIDDEN, 1, 1))
        gpu_producer.call("ack", loc.embedding_id, None)
        reuse = EmbeddingLocation.from_dict(gpu_producer.call("put", 256, HIDDEN, 2, 1))
        assert reuse.key.slot_id == loc.key.slot_id
        with pytest.raises(StaleSlotError):
            asyncio.run(importer.fetch(loc))
        got = asyncio.run(importer.fetch(reuse))
        assert torch.equal(got.cpu(), seeded_embedding(256, HIDDEN, 2))
        gpu_producer.call("ack", reuse.embedding_id, None)


def test_full_gpu_pool_falls_back_to_grpc_stream():
    # 4 MiB pool, 2 MiB items: the third unacked item must be offered by stream.
    proc = ExporterProcess({"pool_bytes": 4 * MIB, "block_bytes": MIB, "ttl_s": 30.0}, "cuda:0")
    try:
        locs = [EmbeddingLocation.from_dict(proc.call("put", 256, HIDDEN, s, 1)) for s in range(3)]
        assert [loc.path for loc in locs] == ["cuda_ipc", "cuda_ipc", "grpc_stream"]
        assert proc.call("stats")["pool_fallbacks"] == 1

        def fetch_fn(loc):
            return proc.call("stream", loc.embedding_id, MIB)

        with EmbeddingImporter(ImporterConfig(device="cuda:0")) as importer:
            for seed, loc in enumerate(locs):
                got = asyncio.run(importer.fetch(loc, fetch_fn))
                assert got.is_cuda
                assert torch.equal(got.cpu(), seeded_embedding(256, HIDDEN, seed))
            assert importer.stats.fetches == {"cuda_ipc": 2, "grpc_stream": 1}
    finally:
        proc.stop()


def test_features_can_be_kept_off_device(gpu_producer):
    config = ImporterConfig(device="cuda:0", keep_on_device=False)
    with EmbeddingImporter(config) as importer:
        loc = EmbeddingLocation.from_dict(gpu_producer.call("put", 64, HIDDEN, 9, 1))
        got = asyncio.run(importer.fetch(loc))
        assert got.device.type == "cpu"
        assert torch.equal(got, seeded_embedding(64, HIDDEN, 9))
        gpu_producer.call("ack", loc.embedding_id, None)
