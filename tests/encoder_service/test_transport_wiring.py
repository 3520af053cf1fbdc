"""The embedding transport through a real encoder process and the client in this process.

The encoder runs ``glimpse encoder`` on the CPU with a 1 MiB shared-memory pool, so the client here
(same host) reads the pool directly; a second client forced onto ``grpc_stream`` reads the same
items by stream. Expected embeddings come from the model package itself (``Reference``), never
from the service; the two paths must agree bit for bit.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest
import torch
from encoder_harness import Reference
from encoder_media import mp4_bytes, png_bytes
from encoder_process import EncoderProcess

from encoder_service.client import EncoderClient
from encoder_service.items import MediaItem, Modality
from encoder_service.transport import (
    DescriptorError,
    EmbeddingImporter,
    ExporterConfig,
    HostIdentity,
    ImporterConfig,
    PoolUnavailableError,
    StaleSlotError,
)
from encoder_service.transport.metrics import POOLS_OPEN

MIB = 1 << 20
BLOCK = ExporterConfig().block_bytes  # the encoder's slot granularity
POOL_SLOTS = MIB // BLOCK  # items of at most one block each fill the pool after this many
FALLBACKS = "glimpse_transport_pool_full_fallbacks_total"
POOL_USED = "glimpse_transport_pool_used_bytes"
ENC = {"role": "encoder"}


@pytest.fixture(scope="module")
def encoders(tiny_ckpt_45) -> Iterator[dict[str, EncoderProcess]]:
    # Both start at once (they load in parallel): a long TTL for most tests, a short one for
    # expiry and for the encoder that dies.
    pool = ("--device", "cpu", "--embedding-pool-mb", "1")
    procs = {
        "main": EncoderProcess.spawn(tiny_ckpt_45, *pool, "--embedding-ttl-s", "60"),
        "short": EncoderProcess.spawn(tiny_ckpt_45, *pool, "--embedding-ttl-s", "1.5"),
    }
    try:
        for proc in procs.values():
            proc.wait_serving()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def ref(tiny_ckpt_45) -> Reference:
    return Reference(tiny_ckpt_45)


def image(i: int, size: tuple[int, int] = (40, 32)) -> MediaItem:
    return MediaItem(i, Modality.IMAGE, data=png_bytes(*size, (i * 37 % 256, 90, 255 - i)))


def stream_only() -> EmbeddingImporter:
    return EmbeddingImporter(ImporterConfig(force_path="grpc_stream"))


def test_shm_reads_equal_the_stream_bit_for_bit_and_ack_frees_the_slots(encoders, ref):
    enc = encoders["main"]
    video = mp4_bytes(frames=8, width=48, height=40, fps=4)
    items = [image(0), image(1, (72, 30)), MediaItem(2, Modality.VIDEO, data=video)]
    streamed_before = enc.metric("glimpse_transport_fetches_total", path="grpc_stream", **ENC)

    async def go():
        async with (
            EncoderClient(enc.target) as pooled,
            EncoderClient(enc.target, importer=stream_only()) as streamed,
        ):
            descs = await pooled.encode(items, num_consumers=2)
            by_pool = [await pooled.fetch(d) for d in descs]
            by_stream = [await streamed.fetch(d, chunk_bytes=1024) for d in descs]
            assert pooled.importer.stats.fetches == {"shm": 3}
            assert pooled.importer.stats.gauges[POOLS_OPEN]() == 1  # opened once, then cached
            assert streamed.importer.stats.fetches == {"grpc_stream": 3}
            assert streamed.importer.stats.gauges[POOLS_OPEN]() == 0
            ids = [d.embedding_id for d in descs]
            assert await pooled.ack(ids, consumer="rank0") == (3, 0)
            assert await pooled.ack(ids, consumer="rank0") == (3, 0)  # a retry counts once
            assert enc.metric(POOL_USED, **ENC) == 3 * BLOCK  # still held for rank1
            assert await streamed.ack(ids, consumer="rank1") == (3, 3)
            with pytest.raises(StaleSlotError) as stale:
                await pooled.fetch(descs[0])
            with pytest.raises(StaleSlotError) as gone:
                await streamed.fetch(descs[0])
            return descs, by_pool, by_stream, stale.value, gone.value

    descs, by_pool, by_stream, stale, gone = asyncio.run(go())
    assert [d.transport for d in descs] == ["shm", "shm", "shm"]
    for a, b in zip(by_pool, by_stream, strict=True):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    for data_item, got in zip(items[:2], by_pool, strict=False):
        want, _ = ref.image(data_item.data)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    want, _, _ = ref.video(video)
    torch.testing.assert_close(by_pool[2], want, rtol=1e-4, atol=1e-5)
    assert stale.status_name == gone.status_name == "DATA_LOSS"
    assert enc.metric(POOL_USED, **ENC) == 0
    after = enc.metric("glimpse_transport_fetches_total", path="grpc_stream", **ENC)
    assert after - streamed_before == 3


def test_full_pool_falls_back_to_the_stream_and_metrics_count_it(encoders, ref):
    enc = encoders["main"]
    items = [image(10 + i) for i in range(POOL_SLOTS + 4)]
    fallbacks_before = enc.metric(FALLBACKS, **ENC)

    async def go():
        async with EncoderClient(enc.target) as client:
            descs = await client.encode(items)  # one request, nothing acked yet
            # Concurrent reads of both kinds must each land in their own request.
            got = await asyncio.gather(*(client.fetch(d) for d in descs))
            fetches = dict(client.importer.stats.fetches)
            used = enc.metric(POOL_USED, **ENC)
            await client.ack([d.embedding_id for d in descs])
            [again] = await client.encode([image(99)])
            await client.fetch(again, ack=True)
            return descs, got, fetches, used, again

    descs, got, fetches, used, again = asyncio.run(go())
    assert all(d.nbytes <= BLOCK for d in descs)  # so each item takes exactly one slot
    paths = [d.transport for d in descs]
    assert paths == ["shm"] * POOL_SLOTS + ["grpc_stream"] * 4
    assert used == MIB
    assert fetches == {"shm": POOL_SLOTS, "grpc_stream": 4}
    assert enc.metric(FALLBACKS, **ENC) - fallbacks_before == 4
    for item, tensor in zip(items, got, strict=True):
        want, _ = ref.image(item.data)
        torch.testing.assert_close(tensor, want, rtol=1e-4, atol=1e-5)
    assert again.transport == "shm"  # acks gave the slots back
    assert enc.metric(POOL_USED, **ENC) == 0


def test_reader_on_another_host_is_offered_the_stream(encoders):
    enc = encoders["main"]
    remote = EmbeddingImporter(host=HostIdentity(boot_id="another-boot", hostname="decoder-2"))
    fallbacks_before = enc.metric(FALLBACKS, **ENC)

    async def go():
        async with EncoderClient(enc.target, importer=remote) as client:
            [desc] = await client.encode([image(50)])
            tensor = await client.fetch(desc, ack=True)
            return desc, tensor

    desc, tensor = asyncio.run(go())
    remote.close()
    assert desc.transport == "grpc_stream" and tensor.shape == desc.shape
    assert remote.stats.fetches == {"grpc_stream": 1}
    assert enc.metric(FALLBACKS, **ENC) == fallbacks_before  # not a full pool: no pool asked


def test_tampered_descriptors_fail_that_fetch_and_never_read_garbage(encoders):
    enc = encoders["main"]

    async def go():
        async with EncoderClient(enc.target) as client:
            [desc] = await client.encode([image(60)])
            loc = desc.location
            outside = dataclasses.replace(loc, offset=MIB)
            old_key = dataclasses.replace(loc.key, generation=loc.key.generation + 1000)
            errors = []
            for bad in (outside, dataclasses.replace(loc, key=old_key)):
                with pytest.raises((DescriptorError, StaleSlotError)) as info:
                    await client.fetch(dataclasses.replace(desc, location=bad))
                errors.append(info.value)
            good = await client.fetch(desc, ack=True)  # the client still serves
            return desc, errors, good

    desc, errors, good = asyncio.run(go())
    assert all(e.status_name == "DATA_LOSS" for e in errors)
    assert "outside" in str(errors[0]) or "slot start" in str(errors[0])
    assert good.shape == desc.shape


def test_unacked_embeddings_expire_so_a_silent_reader_cannot_exhaust_the_pool(encoders):
    enc = encoders["short"]
    expired_before = enc.metric("glimpse_transport_expired_total", **ENC)

    async def go():
        async with EncoderClient(enc.target) as client:
            descs = await client.encode([image(70 + i) for i in range(POOL_SLOTS + 2)])
            assert descs[-1].transport == "grpc_stream"  # the pool was full
            await asyncio.to_thread(enc.wait_metric, POOL_USED, lambda v: v == 0, **ENC)
            errors = []
            for desc in (descs[0], descs[-1]):  # a pool slot and a streamed copy
                with pytest.raises(StaleSlotError) as info:
                    await client.fetch(desc)
                errors.append(info.value)
            [fresh] = await client.encode([image(90)])
            await client.ack([fresh.embedding_id])
            return errors, fresh

    errors, fresh = asyncio.run(go())
    assert all(e.status_name == "DATA_LOSS" for e in errors)
    assert fresh.transport == "shm"
    assert enc.metric("glimpse_transport_expired_total", **ENC) - expired_before >= POOL_SLOTS + 2
    assert enc.metric("glimpse_transport_spilled_bytes", **ENC) == 0


def test_encoder_dying_after_it_replied_is_unavailable_not_garbage(encoders):
    enc = encoders["short"]  # last user of this encoder: the test kills it

    async def go():
        async with (
            EncoderClient(enc.target) as pooled,
            EncoderClient(enc.target, importer=stream_only()) as streamed,
        ):
            first, second = await pooled.encode([image(80), image(81)])
            await pooled.fetch(first)  # the pool is open and cached from here on
            enc.kill()
            errors = []
            for client in (pooled, streamed):
                with pytest.raises(PoolUnavailableError) as info:
                    await client.fetch(second)
                errors.append(info.value)
            return errors

    errors = asyncio.run(go())
    assert [e.status_name for e in errors] == ["UNAVAILABLE", "UNAVAILABLE"]
    assert "gone" in str(errors[0])
