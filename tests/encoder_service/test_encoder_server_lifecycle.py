"""Encoder server with URL fetching allowed on loopback: URLs, bursts, deadlines, health, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import threading
from collections.abc import Iterator

import grpc
import pytest
import torch
from encoder_harness import LoopThread, Reference, RunningEncoder
from encoder_media import mp4_bytes, png_bytes

import encoder_service.server as server_module
from encoder_service.client import EncoderClient
from encoder_service.config import BatchLimits, EncoderConfig, MediaLimits, ModelLoad, ServerLimits
from encoder_service.items import MediaItem, Modality
from encoder_service.server import EncoderServer

BOUND = 4


def permissive_config(ckpt) -> EncoderConfig:
    return EncoderConfig(
        model=ModelLoad(str(ckpt), device="cpu", dtype="float32"),
        media=MediaLimits(allow_private_media_urls=True, media_fetch_timeout_s=10.0),
        batch=BatchLimits(mm_max_concurrent_calls=BOUND, mm_per_request_timeout_s=3.0),
        server=ServerLimits(host="127.0.0.1", port=0),
    )


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def enc(loop, tiny_ckpt_45) -> Iterator[RunningEncoder]:
    running = RunningEncoder.start(loop, permissive_config(tiny_ckpt_45))
    yield running
    running.stop()


def url_item(url: str) -> MediaItem:
    return MediaItem(0, Modality.IMAGE, url=url)


def test_url_media_equals_the_same_bytes_sent_inline(enc, media_http):
    data = png_bytes(60, 40, (200, 100, 0))
    media_http.routes["/pic.png"] = data

    async def go():
        [by_url] = await enc.client.encode([url_item(media_http.url("/redirect?/pic.png"))])
        [inline] = await enc.client.encode([MediaItem(0, Modality.IMAGE, data=data)])
        return by_url, inline, await enc.client.fetch(by_url), await enc.client.fetch(inline)

    by_url, inline, a, b = enc.loop.run(go())
    assert by_url.content_hash == inline.content_hash and torch.equal(a, b)


def test_burst_beyond_the_concurrency_bound_is_queued_not_dropped(enc, media_http):
    blobs = [png_bytes(32 + i, 32, (i * 15, 0, 0)) for i in range(4 * BOUND)]
    for i, blob in enumerate(blobs):
        media_http.routes[f"/burst{i}.png"] = blob
    media_http.delayed_max = 0

    async def burst():
        calls = [
            enc.client.encode([url_item(media_http.url(f"/delay?/burst{i}.png"))])
            for i in range(len(blobs))
        ]
        return await asyncio.gather(*calls)

    replies = enc.loop.run(burst())
    assert len(replies) == len(blobs) and all(r[0].num_tokens > 0 for r in replies)
    assert len({r[0].content_hash for r in replies}) == len(blobs)
    assert 1 <= media_http.delayed_max <= BOUND  # fetched at most BOUND at a time


def test_request_deadline_names_the_slow_item(enc, media_http):
    fast = MediaItem(0, Modality.IMAGE, data=png_bytes(30, 30, (1, 1, 1)))
    slow = MediaItem(1, Modality.IMAGE, url=media_http.url("/slow"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        enc.loop.run(enc.client.encode([fast, slow]))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "item 1 (image, http://127.0.0.1" in info.value.details()
    [ok] = enc.loop.run(enc.client.encode([fast]))  # still serving
    assert ok.num_tokens > 0


def test_private_url_refused_without_the_allow_switch(loop, tiny_ckpt_45, media_http):
    media_http.routes["/p.png"] = png_bytes(30, 30, (5, 6, 7))
    config = permissive_config(tiny_ckpt_45)
    strict = dataclasses.replace(
        config, media=dataclasses.replace(config.media, allow_private_media_urls=False)
    )
    running = RunningEncoder.start(loop, strict)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            loop.run(running.client.encode([url_item(media_http.url("/p.png"))]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "item 0" in info.value.details() and "non-public" in info.value.details()
    finally:
        running.stop()


def test_health_not_serving_until_loaded_then_graceful_shutdown(
    loop, tiny_ckpt_45, media_http, monkeypatch
):
    gate = threading.Event()
    real_load = server_module.load_tower

    def gated_load(load):
        assert gate.wait(30), "test never opened the gate"
        return real_load(load)

    monkeypatch.setattr(server_module, "load_tower", gated_load)
    server = EncoderServer(permissive_config(tiny_ckpt_45))
    port = loop.run(server.start())
    running = RunningEncoder(loop, server, None, port)  # type: ignore[arg-type]
    try:
        assert running.health() == "NOT_SERVING"
        assert running.health("glimpse.encoder.v1.Encoder") == "NOT_SERVING"
        running.client = loop.run(_make_client(port))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            loop.run(running.client.encode([url_item(media_http.url("/x"))]))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        gate.set()
        loop.run(server.wait_ready(), timeout=60)
        assert running.health() == "SERVING"

        media_http.routes["/g.png"] = png_bytes(30, 30, (50, 60, 70))

        async def encode_during_shutdown():
            call = asyncio.ensure_future(
                running.client.encode([url_item(media_http.url("/delay?/g.png"))])
            )
            for _ in range(500):  # bounded: wait until the call is being served
                if media_http.delayed_now or call.done():
                    break
                await asyncio.sleep(0.01)
            assert media_http.delayed_now == 1, "the call never reached the media server"
            await server.stop(grace_s=5.0)
            return await call

        [desc] = loop.run(encode_during_shutdown())
        assert desc.num_tokens > 0  # the in-flight call finished during the grace period
        late = loop.run(_make_client(port))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            loop.run(late.encode([url_item(media_http.url("/g.png"))], timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        loop.run(late.close())
    finally:
        gate.set()
        if running.client is not None:
            loop.run(running.client.close())
        loop.run(server.stop(grace_s=0))


async def _make_client(port: int) -> EncoderClient:
    # a grpc.aio channel belongs to the loop it is created on: build it on the server's loop
    return EncoderClient(f"127.0.0.1:{port}")


def test_glm46v_video_equals_direct_model_output(loop, tiny_ckpt_46):
    running = RunningEncoder.start(loop, permissive_config(tiny_ckpt_46))
    try:
        video = mp4_bytes(frames=20, width=56, height=56, fps=5)

        async def go():
            [desc] = await running.client.encode([MediaItem(0, Modality.VIDEO, data=video)])
            return desc, await running.client.fetch(desc)

        desc, got = loop.run(go())
    finally:
        running.stop()
    want, grid, stamps = Reference(tiny_ckpt_46).video(video)
    assert desc.grid_thw == grid and desc.timestamps == pytest.approx(stamps)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_warm_encoder_freezes_its_loaded_heap_and_stop_thaws_it(tiny_ckpt_45):
    # a full collection over the loaded heap stalls encodes; frozen objects are never scanned
    gc.unfreeze()  # servers started by other tests may have frozen objects already
    thread = LoopThread()
    try:
        running = RunningEncoder.start(thread, permissive_config(tiny_ckpt_45))
        assert gc.get_freeze_count() > 0
        assert running.server.pipeline is not None
        running.stop()
        assert gc.get_freeze_count() == 0
    finally:
        thread.close()
