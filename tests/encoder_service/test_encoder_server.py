"""A real encoder server on 127.0.0.1: embeddings, concurrency, bad input, cache, fetch and ack."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from encoder_harness import LoopThread, Reference, RunningEncoder
from encoder_media import mp4_bytes, png_bytes

from encoder_service.config import BatchLimits, EncoderConfig, MediaLimits, ModelLoad, ServerLimits
from encoder_service.items import MediaItem, MediaOptions, Modality
from encoder_service.transport import StaleSlotError

MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("encoder_media")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(png_bytes(40, 30, (10, 200, 30)))
    (root / "outside.png").write_bytes(png_bytes(40, 30, (10, 20, 30)))
    os.symlink(root / "outside.png", allowed / "link.png")
    return root


@pytest.fixture(scope="module")
def enc(loop, tiny_ckpt_45, media_root) -> Iterator[RunningEncoder]:
    config = EncoderConfig(
        model=ModelLoad(str(tiny_ckpt_45), device="cpu", dtype="float32"),
        media=MediaLimits(
            allowed_local_media_path=str(media_root / "allowed"),
            max_media_bytes=2 << 20,
            max_image_pixels=MAX_PIXELS,
            media_fetch_timeout_s=2.0,
        ),
        batch=BatchLimits(mm_max_concurrent_calls=4, mm_per_request_timeout_s=30.0),
        server=ServerLimits(host="127.0.0.1", port=0),
    )
    running = RunningEncoder.start(loop, config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def ref(tiny_ckpt_45) -> Reference:
    return Reference(tiny_ckpt_45)


def image(data: bytes, **opts) -> MediaItem:
    return MediaItem(0, Modality.IMAGE, data=data, options=MediaOptions(**opts))


def encode_and_fetch(enc: RunningEncoder, items: list[MediaItem], chunk_bytes: int = 0):
    async def go():
        descs = await enc.client.encode(items)
        tensors = [await enc.client.fetch(d, chunk_bytes=chunk_bytes) for d in descs]
        await enc.client.ack([d.embedding_id for d in descs])
        return descs, tensors

    return enc.loop.run(go())


def test_serving_health_and_reflection(enc):
    assert enc.health("") == "SERVING"
    assert enc.health("glimpse.encoder.v1.Encoder") == "SERVING"

    async def services() -> list[str]:
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{enc.port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            async for reply in stub.ServerReflectionInfo(iter([request])):
                return [s.name for s in reply.list_services_response.service]
        return []

    assert "glimpse.encoder.v1.Encoder" in enc.loop.run(services())


def test_images_and_video_equal_direct_model_output(enc, ref):
    img_a, img_b = png_bytes(64, 48, (0, 0, 0)), png_bytes(30, 90, (90, 10, 50), fmt="JPEG")
    video = mp4_bytes(frames=12, width=64, height=48, fps=4)
    items = [image(img_a), image(img_b), MediaItem(2, Modality.VIDEO, data=video)]
    descs, tensors = encode_and_fetch(enc, items, chunk_bytes=1024)
    for data, desc, got in zip((img_a, img_b), descs, tensors, strict=False):
        want, grid = ref.image(data)
        assert desc.grid_thw == grid and desc.num_tokens == want.shape[0] == got.shape[0]
        assert desc.modality is Modality.IMAGE and desc.timestamps == ()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    want, grid, stamps = ref.video(video)
    assert descs[2].grid_thw == grid and grid[0] > 1
    assert descs[2].timestamps == pytest.approx(stamps)
    torch.testing.assert_close(tensors[2], want, rtol=1e-4, atol=1e-5)
    assert len({d.content_hash for d in descs}) == 3


def test_32_concurrent_requests_each_get_their_own_embedding(enc, ref):
    blobs = [
        png_bytes(28 + 4 * (i % 8), 28 + 2 * i, (i * 7, 255 - i * 5, i * 3)) for i in range(32)
    ]

    async def one(data: bytes):
        [desc] = await enc.client.encode([image(data)])
        got = await enc.client.fetch(desc)
        await enc.client.ack([desc.embedding_id])
        return got

    async def all_at_once():
        return await asyncio.gather(*(one(b) for b in blobs))

    results = enc.loop.run(all_at_once())
    for data, got in zip(blobs, results, strict=True):
        want, _ = ref.image(data)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def bad_cases(media_root: Path) -> list[tuple[str, MediaItem, grpc.StatusCode, str]]:
    allowed = (media_root / "allowed").as_posix()
    good_png = png_bytes(40, 30, (1, 2, 3))
    video = mp4_bytes(frames=8)
    truncated = video[: len(video) // 3]

    def url(u: str, modality: Modality = Modality.IMAGE) -> MediaItem:
        return MediaItem(1, modality, url=u)

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    return [
        ("ftp scheme", url("ftp://example.com/a.png"), invalid, "http(s), data or file"),
        ("unresolvable host", url("http://no-such-host.invalid/a.png"), invalid, "resolve"),
        ("private address", url("http://10.0.0.1/a.png"), invalid, "non-public"),
        ("loopback", url("http://127.0.0.1:9/a.png"), invalid, "non-public"),
        ("metadata address", url("http://169.254.169.254/latest"), invalid, "non-public"),
        ("oversized", MediaItem(1, Modality.IMAGE, data=b"\0" * (3 << 20)), invalid, "limit"),
        ("not an image", MediaItem(1, Modality.IMAGE, data=b"hello world" * 10), invalid, "image"),
        ("not a video", MediaItem(1, Modality.VIDEO, data=b"\x00garbage" * 64), invalid, "video"),
        ("empty video", MediaItem(1, Modality.VIDEO, data=b""), invalid, "empty"),
        ("truncated video", MediaItem(1, Modality.VIDEO, data=truncated), invalid, "video"),
        ("too many pixels", image(png_bytes(1200, 1000, (5, 5, 5))), invalid, str(MAX_PIXELS)),
        ("dotdot", url(f"file://{allowed}/../outside.png"), invalid, "'..'"),
        ("encoded dotdot", url(f"file://{allowed}/%2E%2E/outside.png"), invalid, "'..'"),
        ("symlink escape", url(f"file://{allowed}/link.png"), invalid, "outside"),
        ("absolute outside", url("file:///etc/hostname"), invalid, "outside"),
        ("bad data url", url("data:image/png,rawtext"), invalid, "base64"),
        ("max_pixels above model", image(good_png, max_pixels=10**9), invalid, "max_pixels"),
    ]


def test_bad_inputs_fail_naming_the_item_and_server_keeps_serving(enc, media_root):
    good = image(png_bytes(40, 30, (1, 2, 3)))
    for name, bad, code, needle in bad_cases(media_root):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            enc.loop.run(enc.client.encode([good, bad]))
            pytest.fail(f"{name}: accepted")
        assert info.value.code() == code, (name, info.value.details())
        details = info.value.details()
        assert details.startswith("item 1 ("), (name, details)
        assert needle in details, (name, details)
        assert not re.search(r"object at|0x[0-9a-f]{8}", details), (name, details)  # no reprs
    descs, tensors = encode_and_fetch(enc, [good])  # still serving
    assert tensors[0].shape[0] == descs[0].num_tokens > 0


def test_allowed_local_file_is_read(enc, media_root, ref):
    path = (media_root / "allowed" / "cat.png").as_posix()
    _, [got] = encode_and_fetch(enc, [MediaItem(0, Modality.IMAGE, url=f"file://{path}")])
    want, _ = ref.image((media_root / "allowed" / "cat.png").read_bytes())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_repeated_image_is_a_cache_hit_that_skips_the_vit(enc):
    data = png_bytes(52, 36, (33, 66, 99))
    [first], [emb1] = encode_and_fetch(enc, [image(data)])
    forwards = enc.server.batcher.forwards
    hits = enc.metric("vlm:mm_cache_hits_total")
    [again], [emb2] = encode_and_fetch(enc, [image(data)])
    assert not first.cache_hit and again.cache_hit
    assert enc.server.batcher.forwards == forwards  # no vision tower forward
    assert enc.metric("vlm:mm_cache_hits_total") == hits + 1
    assert again.content_hash == first.content_hash and torch.equal(emb1, emb2)
    # the same pixels in another container hash the same (the hash covers decoded media)
    bmp = png_bytes(52, 36, (33, 66, 99), fmt="BMP")
    [as_bmp], _ = encode_and_fetch(enc, [image(bmp)])
    assert as_bmp.cache_hit and as_bmp.content_hash == first.content_hash
    # different processing options are a different embedding
    [smaller], _ = encode_and_fetch(enc, [image(data, max_pixels=2 * 28 * 28 * 2)])
    assert not smaller.cache_hit and smaller.content_hash != first.content_hash


def test_embedding_lives_until_every_consumer_acked(enc):
    from protos import encoder_pb2 as pb
    from protos import encoder_pb2_grpc as pb_grpc

    async def go():
        [desc] = await enc.client.encode([image(png_bytes(44, 44, (9, 9, 9)))], num_consumers=2)
        assert desc.transport == "shm" and desc.ttl_s > 0  # same host: the shared-memory pool
        assert desc.nbytes == desc.num_tokens * desc.shape[1] * 4 and desc.dtype == "float32"
        first = await enc.client.fetch(desc, chunk_bytes=1024)
        assert await enc.client.ack([desc.embedding_id]) == (1, 0)
        second = await enc.client.fetch(desc)
        assert torch.equal(first, second)
        assert await enc.client.ack([desc.embedding_id]) == (1, 1)
        with pytest.raises(StaleSlotError) as info:
            await enc.client.fetch(desc)
        assert info.value.status_name == "DATA_LOSS"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{enc.port}") as channel:
            request = pb.FetchEmbeddingRequest(embedding_id=desc.embedding_id)
            with pytest.raises(grpc.aio.AioRpcError) as rpc:
                async for _ in pb_grpc.EncoderStub(channel).FetchEmbedding(request, timeout=10):
                    pass
        assert rpc.value.code() == grpc.StatusCode.NOT_FOUND

    enc.loop.run(go())


def test_malformed_requests_are_invalid_argument(enc):
    from protos import encoder_pb2 as pb
    from protos import encoder_pb2_grpc as pb_grpc

    async def call(request):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{enc.port}") as channel:
            return await pb_grpc.EncoderStub(channel).Encode(request, timeout=10)

    no_modality = pb.EncodeRequest(items=[pb.MediaItem(data=b"x")])
    no_source = pb.EncodeRequest(items=[pb.MediaItem(modality=pb.MODALITY_IMAGE)])
    for request, needle in (
        (pb.EncodeRequest(), "no items"),
        (no_modality, "item 0: modality"),
        (no_source, "item 0: set either"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            enc.loop.run(call(request))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in info.value.details()
