"""Decoder servers of their own, started per test on the tiny GLM-4.5V checkpoint: one that
cannot load, one spreading media over two encoders, a text-only one with a small KV pool that
drains on shutdown, and the garbage-collection freeze of a warm one."""

from __future__ import annotations

import asyncio
import gc
from dataclasses import replace

import grpc
import pytest
from decoder_harness import (
    ServiceLoop,
    chat,
    collect,
    decoder_config,
    health,
    image,
    long_request,
    png,
    start_decoder,
    start_encoder,
    stub,
    text,
    wait_for,
)

from decoder_service.server import DecoderServer
from protos import decoder_pb2 as pb

pytestmark = pytest.mark.timeout(300)


def test_a_decoder_that_cannot_load_stays_not_serving(tmp_path):
    loop = ServiceLoop()
    server = DecoderServer(decoder_config(tmp_path / "missing"))
    port = loop.run(server.start())
    try:
        with pytest.raises(Exception):  # noqa: B017 - whatever loading raised
            loop.run(server.wait_ready())
        assert health(port) == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as err:
            collect(stub(port).Generate(pb.GenerateRequest(prompt="hi"), timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        loop.run(server.stop(grace_s=0))
        loop.close()


def test_media_is_spread_over_two_healthy_encoders(tiny_ckpt_45):
    loop = ServiceLoop()
    encoders = [start_encoder(loop, tiny_ckpt_45) for _ in range(2)]
    urls = tuple(f"127.0.0.1:{port}" for _, port in encoders)
    decoder = start_decoder(loop, decoder_config(tiny_ckpt_45, urls, max_images=4, max_videos=1))
    try:
        client = stub(decoder.port)
        for i in range(2):
            parts = [image(png((30 * i + k, 60, 90))) for k in range(3)]
            ids, _, _ = collect(client.Generate(chat(*parts, text("?"), max_tokens=2), timeout=30))
            assert ids
        labels = {"method": "Encode", "code": "OK"}
        counts = [server.metrics.value("vlm:encoder_rpcs_total", labels) for server, _ in encoders]
        assert sum(counts) == 6 and min(counts) >= 2, counts
    finally:
        loop.run(decoder.stop(grace_s=0))
        for server, _ in encoders:
            loop.run(server.stop(grace_s=0))
        loop.close()


def test_text_only_small_pool_decoder_refuses_media_and_drains_on_shutdown(tiny_ckpt_45):
    loop = ServiceLoop()
    config = decoder_config(tiny_ckpt_45)
    config = replace(
        config,
        server=replace(config.server, shutdown_drain_s=0.5),
        engine=replace(config.engine, cache=replace(config.engine.cache, num_blocks=8)),
    )
    decoder = start_decoder(loop, config)
    client = stub(decoder.port)
    try:
        # without max_tokens a request may use the rest of what the (small) KV pool holds
        endless = pb.SamplingParams(temperature=0, ignore_eos=True)
        _, _, last = collect(client.Generate(pb.GenerateRequest(prompt="go", sampling=endless)))
        assert last.finish_reason == pb.LENGTH
        assert last.usage.prompt_tokens + last.usage.completion_tokens == 8 * 16
        info = client.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
        assert list(info.modalities) == [pb.TEXT]
        with pytest.raises(grpc.RpcError) as err:
            collect(client.Generate(chat(image(png((1, 2, 3))), text("?")), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("invalid_image")
        sampling = pb.SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        call = client.Generate(pb.GenerateRequest(prompt="go", sampling=sampling), timeout=60)
        first = next(call)
        stopping = asyncio.run_coroutine_threadsafe(decoder.stop(grace_s=None), loop.loop)
        assert wait_for(lambda: health(decoder.port) == "NOT_SERVING", timeout=5)
        ids, _, last = collect(call)
        assert len(first.token_ids) + len(ids) == 40 and last.finish_reason == pb.LENGTH
        stopping.result(timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            collect(client.Generate(pb.GenerateRequest(prompt="late"), timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        loop.close()


def test_warm_decoder_keeps_its_loaded_heap_out_of_garbage_collection(tiny_ckpt_45):
    # a full collection over the loaded heap stalls the engine thread mid-step (over 100 ms
    # measured by bench/engine_host_bench.py); once warm the decoder freezes that heap, and
    # stopping thaws it so a stopped engine can be collected
    gc.unfreeze()  # the module's running service has frozen objects already
    loop = ServiceLoop()
    decoder = start_decoder(loop, decoder_config(tiny_ckpt_45))
    try:
        assert gc.get_freeze_count() > 0
        ids, _, _ = collect(stub(decoder.port).Generate(long_request(), timeout=30))
        assert ids
    finally:
        loop.run(decoder.stop(grace_s=0))
        loop.close()
    assert gc.get_freeze_count() == 0
