"""The decoder's --mm-transport flag decides how embeddings travel from a same-host encoder.

Two decoders share one real encoder on 127.0.0.1: one picks the path by host identity (the
encoder's shared-memory pool on a CPU host), one is forced onto the grpc_stream path. Both must
answer the same image request with the same tokens, and each importer must have used the path
it was told to.
"""

from __future__ import annotations

import argparse
import urllib.request
from dataclasses import replace

import pytest
from decoder_harness import (
    ServiceLoop,
    chat,
    collect,
    decoder_config,
    free_port,
    image,
    png,
    start_decoder,
    start_encoder,
    stub,
    text,
)

from decoder_service import cli


@pytest.fixture(scope="module")
def services(tiny_ckpt_45):
    loop = ServiceLoop()
    encoder, port = start_encoder(loop, tiny_ckpt_45)
    base = decoder_config(tiny_ckpt_45, (f"127.0.0.1:{port}",))
    decoders = {}
    for name, path in (("auto", None), ("stream", "grpc_stream")):
        server = replace(base.server, enable_metrics=True, metrics_port=free_port())
        config = replace(base, encoders=replace(base.encoders, transport=path), server=server)
        decoders[name] = start_decoder(loop, config)
    yield decoders
    for server in decoders.values():
        loop.run(server.stop())
    loop.run(encoder.stop())
    loop.close()


def _ask(server) -> list[int]:
    request = chat(image(png((200, 40, 90))), text("What is it?"), max_tokens=6, temperature=0)
    ids, _, _ = collect(stub(server.port).Generate(request, timeout=60))
    return ids


def test_forced_stream_and_auto_paths_give_the_same_answer(services):
    auto, stream = services["auto"], services["stream"]
    assert _ask(auto) == _ask(stream)
    auto_fetches = auto._pool.importer.stats.fetches
    stream_fetches = stream._pool.importer.stats.fetches
    assert auto_fetches["shm"] >= 1 and auto_fetches["grpc_stream"] == 0
    assert stream_fetches["grpc_stream"] >= 1 and stream_fetches["shm"] == 0
    # and the decoders say so on their metrics page
    for server, path in ((auto, "shm"), (stream, "grpc_stream")):
        port = server.config.server.metrics_port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        line = f'glimpse_transport_fetches_total{{path="{path}",role="decoder"}}'
        assert any(
            row.startswith(line) and float(row.split()[-1]) >= 1
            for row in body.decode().splitlines()
        ), f"{line} missing"


def test_cli_flags_reach_the_encoder_pool_config(tiny_ckpt_45):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    base = ["--model-path", str(tiny_ckpt_45), "--encoder-urls", "127.0.0.1:1"]
    args = parser.parse_args(base + ["--mm-transport", "shm", "--no-keep-mm-feature-on-device"])
    enc = cli.config_from_args(args).encoders
    assert enc.transport == "shm" and enc.keep_mm_feature_on_device is False
    enc = cli.config_from_args(parser.parse_args(base)).encoders
    assert enc.transport is None and enc.keep_mm_feature_on_device is True


def test_the_kv_pool_leaves_the_feature_budget_free_only_when_features_stay_on_device(
    tiny_ckpt_45,
):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    path = ["--model-path", str(tiny_ckpt_45)]
    encoders = path + ["--encoder-urls", "127.0.0.1:1"]
    cfg = cli.config_from_args(parser.parse_args(encoders + ["--mm-device-budget-mb", "300"]))
    assert cfg.encoders.mm_device_budget_mb == 300 and cfg.engine.cache.reserved_gpu_mb == 300
    cfg = cli.config_from_args(parser.parse_args(encoders + ["--no-keep-mm-feature-on-device"]))
    assert cfg.engine.cache.reserved_gpu_mb == 0  # features wait in host memory
    cfg = cli.config_from_args(parser.parse_args(path))
    assert cfg.engine.cache.reserved_gpu_mb == 0  # no encoders, no features
    with pytest.raises(ValueError, match="mm_device_budget_mb"):
        cli.config_from_args(parser.parse_args(encoders + ["--mm-device-budget-mb", "-1"]))
