"""A real encoder server on 127.0.0.1 for tests, run on an event loop in a background thread.

Contract: ``LoopThread.run(coro)`` runs a coroutine on the background loop and returns its result
(bounded wait). ``RunningEncoder.start(config)`` starts an ``EncoderServer`` there, waits until it
is SERVING and opens an ``EncoderClient``; ``stop()`` closes both. ``Reference`` computes
embeddings straight from the model package (decoder, processor, tower), the ground truth the
server must reproduce.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from encoder_service.client import EncoderClient
from encoder_service.config import EncoderConfig
from encoder_service.server import EncoderServer
from models.glm4v.loader import load_model
from models.glm4v.processing.image import preprocess_image
from models.glm4v.processing.media import decode_image, decode_video
from models.glm4v.processing.processor_config import load_processor_config
from models.glm4v.processing.video import preprocess_video

T = TypeVar("T")


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


@dataclass
class RunningEncoder:
    loop: LoopThread
    server: EncoderServer
    client: EncoderClient
    port: int

    @classmethod
    def start(cls, loop: LoopThread, config: EncoderConfig) -> RunningEncoder:
        async def go() -> RunningEncoder:
            server = EncoderServer(config)
            port = await server.start()
            await server.wait_ready()
            return cls(loop, server, EncoderClient(f"127.0.0.1:{port}"), port)

        return loop.run(go(), timeout=120)

    def stop(self) -> None:
        async def go() -> None:
            await self.client.close()
            await self.server.stop(grace_s=1.0)

        self.loop.run(go())

    def health(self, service: str = "") -> str:
        async def go() -> str:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

        return self.loop.run(go())

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.server.metrics.value(name, labels)


class Reference:
    """Embeddings computed directly with the model package, outside the service."""

    def __init__(self, ckpt: Path) -> None:
        self.processor = load_processor_config(ckpt)
        model = load_model(ckpt, torch.float32, "cpu", vision=True, text=False)
        self.tower = model.visual

    @torch.inference_mode()
    def image(self, data: bytes) -> tuple[torch.Tensor, tuple[int, int, int]]:
        vision = preprocess_image(decode_image(data), self.processor.image)
        grid = torch.tensor([vision.grid_thw])
        return self.tower(vision.pixel_values, grid), vision.grid_thw

    @torch.inference_mode()
    def video(self, data: bytes) -> tuple[torch.Tensor, tuple[int, int, int], list[float]]:
        decoded = decode_video(data, self.processor.sampling)
        vision = preprocess_video(
            decoded.frames, decoded.frame_indices, decoded.meta.fps, self.processor.video
        )
        grid = torch.tensor([vision.grid_thw])
        return self.tower(vision.pixel_values, grid), vision.grid_thw, vision.timestamps
