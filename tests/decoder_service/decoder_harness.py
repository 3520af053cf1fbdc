"""A real decoder server (and encoder) on 127.0.0.1 for tests, on a background event loop.

Contract: ``ServiceLoop.run(coro)`` runs a coroutine on the background loop (bounded wait).
``start_encoder`` / ``start_decoder`` start in-process servers there and wait until they serve;
``decoder_config`` builds a small CPU configuration. Tests talk to the servers with ordinary
synchronous gRPC stubs from the test thread, as any client would.
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from decoder_service.config import DecoderServiceConfig, EncoderPoolConfig, ServerConfig
from decoder_service.engine.config import (
    CacheConfig,
    EngineConfig,
    LoadConfig,
    MediaLimits,
    SchedulerConfig,
)
from decoder_service.server import DecoderServer
from encoder_service.config import EncoderConfig, ModelLoad, ServerLimits
from encoder_service.server import EncoderServer
from protos import decoder_pb2 as pb
from protos import decoder_pb2_grpc as pb_grpc

T = TypeVar("T")
MAX_MODEL_LEN = 256


class ServiceLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def decoder_config(
    ckpt: Path, encoder_urls: tuple[str, ...] = (), **media: int
) -> DecoderServiceConfig:
    return DecoderServiceConfig(
        engine=EngineConfig(
            load=LoadConfig(model_path=str(ckpt), dtype="float32", device="cpu"),
            cache=CacheConfig(num_blocks=128),
            scheduler=SchedulerConfig(max_model_len=MAX_MODEL_LEN),
            media=MediaLimits(**media) if media else MediaLimits(max_images=2, max_videos=1),
        ),
        encoders=EncoderPoolConfig(encoder_urls=encoder_urls, health_interval_s=0.2),
        server=ServerConfig(host="127.0.0.1", port=0, shutdown_drain_s=0, shutdown_grace_s=1),
    )


def start_encoder(loop: ServiceLoop, ckpt: Path) -> tuple[EncoderServer, int]:
    async def go() -> tuple[EncoderServer, int]:
        server = EncoderServer(
            EncoderConfig(
                model=ModelLoad(str(ckpt), "cpu", "float32"),
                server=ServerLimits(host="127.0.0.1", port=0),
            )
        )
        port = await server.start()
        await server.wait_ready()
        return server, port

    return loop.run(go())


def start_decoder(loop: ServiceLoop, config: DecoderServiceConfig) -> DecoderServer:
    async def go() -> DecoderServer:
        server = DecoderServer(config)
        await server.start()
        await server.wait_ready()
        return server

    return loop.run(go())


def stub(port: int) -> pb_grpc.DecoderStub:
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
    )
    return pb_grpc.DecoderStub(channel)


def health(port: int, service: str = "glimpse.decoder.v1.Decoder") -> str:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def png(color: tuple[int, int, int], size: tuple[int, int] = (100, 70)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def chat(*parts: pb.ContentPart, **sampling: Any) -> pb.GenerateRequest:
    msg = pb.ChatMessage(role="user", content=list(parts))
    return pb.GenerateRequest(
        chat=pb.ChatInput(messages=[msg]), sampling=pb.SamplingParams(**sampling)
    )


def text(value: str) -> pb.ContentPart:
    return pb.ContentPart(text=value)


def image(data: bytes) -> pb.ContentPart:
    return pb.ContentPart(image=pb.ImageInput(data=data))


def collect(responses) -> tuple[list[int], str, pb.GenerateResponse]:
    ids, parts, last = [], [], None
    for r in responses:
        ids += r.token_ids
        parts.append(r.text)
        last = r
    assert last is not None and last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    return ids, "".join(parts), last


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def long_request(request_id: str = "") -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=0, max_tokens=MAX_MODEL_LEN - 8, ignore_eos=True)
    return pb.GenerateRequest(request_id=request_id, prompt="count", sampling=sampling)
