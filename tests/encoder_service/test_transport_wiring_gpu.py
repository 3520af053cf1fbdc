"""The cuda_ipc path through a real GPU encoder process (GPU only; skipped without CUDA).

The encoder runs ``glimpse encoder --device cuda:0`` with a 1 MiB GPU pool; this process imports on
cuda:0. A second client forced onto ``grpc_stream`` reads the same items by stream: both paths
must agree bit for bit, and the pool handle must be opened once for all items.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch
from encoder_media import png_bytes
from encoder_process import EncoderProcess

from encoder_service.client import EncoderClient
from encoder_service.items import MediaItem, Modality
from encoder_service.store import EmbeddingStore
from encoder_service.transport import EmbeddingImporter, ExporterConfig, ImporterConfig
from encoder_service.transport.metrics import POOLS_OPEN

pytestmark = pytest.mark.gpu

MIB = 1 << 20
BLOCK = ExporterConfig().block_bytes
POOL_SLOTS = MIB // BLOCK
FALLBACKS = "glimpse_transport_pool_full_fallbacks_total"
POOL_USED = "glimpse_transport_pool_used_bytes"
ENC = {"role": "encoder"}


@pytest.fixture(scope="module")
def gpu_encoder(tiny_ckpt_45) -> Iterator[EncoderProcess]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    flags = ("--device", "cuda:0", "--embedding-pool-mb", "1", "--embedding-ttl-s", "60")
    proc = EncoderProcess.spawn(tiny_ckpt_45, *flags)
    try:
        yield proc.wait_serving()
    finally:
        proc.stop()


def image(i: int) -> MediaItem:
    return MediaItem(i, Modality.IMAGE, data=png_bytes(40 + i % 7, 32, (i * 29 % 256, 10, 200)))


def gpu_importer(**kwargs) -> EmbeddingImporter:
    return EmbeddingImporter(ImporterConfig(device="cuda:0", **kwargs))


def stream_only() -> EmbeddingImporter:
    return EmbeddingImporter(ImporterConfig(force_path="grpc_stream"))


def count_opens(importer: EmbeddingImporter) -> list:
    calls: list = []
    original = importer._open

    def counted(*args):
        calls.append(args)
        return original(*args)

    importer._open = counted  # type: ignore[method-assign]
    return calls


def test_cuda_ipc_equals_the_stream_bit_for_bit_with_the_pool_opened_once(gpu_encoder):
    importer = gpu_importer()
    opens = count_opens(importer)

    async def go():
        async with (
            EncoderClient(gpu_encoder.target, importer=importer) as gpu,
            EncoderClient(gpu_encoder.target, importer=stream_only()) as streamed,
        ):
            descs = await gpu.encode([image(i) for i in range(4)])
            by_ipc = [await gpu.fetch(d) for d in descs]
            by_stream = [await streamed.fetch(d, chunk_bytes=4096) for d in descs]
            await gpu.ack([d.embedding_id for d in descs])
            return descs, by_ipc, by_stream

    descs, by_ipc, by_stream = asyncio.run(go())
    try:
        assert [d.transport for d in descs] == ["cuda_ipc"] * 4
        for a, b in zip(by_ipc, by_stream, strict=True):
            assert a.device == torch.device("cuda", 0) and b.device.type == "cpu"
            assert torch.equal(a.cpu(), b)
        assert len(opens) == 1 and importer.stats.gauges[POOLS_OPEN]() == 1
        assert importer.stats.fetches == {"cuda_ipc": 4}
        assert gpu_encoder.metric(POOL_USED, **ENC) == 0
    finally:
        importer.close()


def test_features_can_be_kept_off_the_device(gpu_encoder):
    importer = gpu_importer(keep_on_device=False)

    async def go():
        async with EncoderClient(gpu_encoder.target, importer=importer) as client:
            [desc] = await client.encode([image(20)])
            return desc, await client.fetch(desc, ack=True)

    desc, got = asyncio.run(go())
    importer.close()
    assert desc.transport == "cuda_ipc" and got.device.type == "cpu"
    assert importer.stats.fetches == {"cuda_ipc": 1}


def test_features_past_the_device_budget_wait_in_host_memory(gpu_encoder):
    async def go(importer):
        async with EncoderClient(gpu_encoder.target, importer=importer) as client:
            descs = await client.encode([image(21), image(22)])
            return descs, [await client.fetch(d, ack=True) for d in descs]

    probe = gpu_importer()
    (first, _), _ = asyncio.run(go(probe))
    probe.close()
    importer = gpu_importer(device_budget_bytes=first.nbytes)  # room for one of the two
    descs, got = asyncio.run(go(importer))
    importer.close()
    assert [d.transport for d in descs] == ["cuda_ipc", "cuda_ipc"]
    assert [t.device.type for t in got] == ["cuda", "cpu"]
    assert importer.budget.held == descs[0].nbytes and importer.budget.overflowed == 1
    del got  # the features are dropped: their device bytes return to the budget
    assert importer.budget.held == 0


def test_full_gpu_pool_falls_back_to_the_stream_and_metrics_count_it(gpu_encoder):
    importer = gpu_importer()
    items = [image(30 + i) for i in range(POOL_SLOTS + 3)]
    before = gpu_encoder.metric(FALLBACKS, **ENC)

    async def go():
        async with (
            EncoderClient(gpu_encoder.target, importer=importer) as gpu,
            EncoderClient(gpu_encoder.target, importer=stream_only()) as streamed,
        ):
            descs = await gpu.encode(items)
            got = await asyncio.gather(*(gpu.fetch(d) for d in descs))
            want = [await streamed.fetch(d) for d in descs]
            await gpu.ack([d.embedding_id for d in descs])
            return descs, got, want

    descs, got, want = asyncio.run(go())
    importer.close()
    assert all(d.nbytes <= BLOCK for d in descs)
    assert [d.transport for d in descs] == ["cuda_ipc"] * POOL_SLOTS + ["grpc_stream"] * 3
    assert gpu_encoder.metric(FALLBACKS, **ENC) - before == 3
    assert importer.stats.fetches == {"cuda_ipc": POOL_SLOTS, "grpc_stream": 3}
    for a, b in zip(got, want, strict=True):
        assert a.is_cuda and torch.equal(a.cpu(), b)


def test_shm_transport_serves_a_gpu_tower_from_host_memory():
    store = EmbeddingStore(
        ExporterConfig(pool_bytes=4 * BLOCK), 1 << 20, device="cuda:0", transport="shm"
    )
    try:
        emb = torch.randn(7, 64, device="cuda:0", dtype=torch.bfloat16)
        [loc] = store.put_all([emb])
        assert store.pool_path == "shm" and loc.path == "shm"
        raw = b"".join(c.data for c in store.stream(loc.embedding_id))
        back = torch.frombuffer(bytearray(raw), dtype=torch.bfloat16).view(7, 64)
        assert torch.equal(back, emb.cpu())
    finally:
        store.close()
