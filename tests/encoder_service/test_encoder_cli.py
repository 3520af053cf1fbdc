"""``glimpse encoder`` as a real process: health probe, Prometheus metrics, SIGTERM shutdown."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent import futures

import grpc
from encoder_media import png_bytes
from grpc_health.v1 import health, health_pb2_grpc

from encoder_service import cli as encoder_cli
from encoder_service import probe
from encoder_service.client import EncoderClient
from encoder_service.items import MediaItem, Modality


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_fails_when_nothing_listens():
    port = free_port()
    assert probe.main(["--port", str(port), "--timeout", "0.5"]) == 1


def test_encoder_process_serves_reports_metrics_and_stops_on_sigterm(tiny_ckpt_45):
    port, metrics_port = free_port(), free_port()
    cmd = [
        sys.executable, "-m", "glimpse.cli", "encoder",
        "--model-path", str(tiny_ckpt_45), "--host", "127.0.0.1", "--port", str(port),
        "--device", "cpu", "--enable-metrics", "--metrics-port", str(metrics_port),
        "--shutdown-grace-s", "2",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        status = "UNAVAILABLE"
        while time.monotonic() < deadline and proc.poll() is None:
            status = probe.check("127.0.0.1", port, timeout_s=1.0)
            if status == "SERVING":
                break
            time.sleep(0.2)  # bounded poll of a separate process
        assert status == "SERVING", proc.stdout.read() if proc.poll() is not None else status

        async def encode_once() -> int:
            async with EncoderClient(f"127.0.0.1:{port}") as client:
                data = png_bytes(40, 40, (3, 4, 5))
                [desc] = await client.encode([MediaItem(0, Modality.IMAGE, data=data)])
                return desc.num_tokens

        assert asyncio.run(encode_once()) > 0
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
        text = text.decode()
        assert 'vlm:mm_items_total{modality="image"}' in text
        assert "vlm:encoder_queue_depth" in text and "vlm:encoder_latency_seconds_bucket" in text

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_bad_allowed_dir_flag_exits_2(tmp_path):
    cmd = [
        sys.executable, "-m", "glimpse.cli", "encoder", "--model-path", str(tmp_path),
        "--allowed-local-media-path", str(tmp_path / "missing"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not a directory" in done.stderr


def test_probe_reports_unknown_service_as_failure():
    # a health server that never registered the encoder: Check answers NOT_FOUND
    server = grpc.server(futures.ThreadPoolExecutor(1))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        assert probe.check("127.0.0.1", port, "glimpse.encoder.v1.Encoder") == "NOT_FOUND"
        assert probe.main(["--port", str(port), "--service", "glimpse.encoder.v1.Encoder"]) == 1
    finally:
        server.stop(0)


def test_transport_flags_reach_the_config_and_bad_choices_exit_2(tmp_path, caplog):
    parser = argparse.ArgumentParser()
    encoder_cli.add_arguments(parser)
    base = ["--model-path", str(tmp_path), "--device", "cpu"]
    args = parser.parse_args(
        [*base, "--transport", "grpc_stream", "--embedding-pool-mb", "64", "--embedding-ttl-s", "5"]
    )
    store = encoder_cli.config_from_args(args).store
    assert (store.transport, store.embedding_pool_mb, store.embedding_ttl_s) == (
        "grpc_stream",
        64,
        5,
    )
    assert encoder_cli.run(parser.parse_args([*base, "--transport", "cuda_ipc"])) == 2
    assert "cuda_ipc needs a CUDA device" in caplog.text
    assert encoder_cli.run(parser.parse_args([*base, "--embedding-ttl-s", "0"])) == 2
    assert "TTL must be positive" in caplog.text
