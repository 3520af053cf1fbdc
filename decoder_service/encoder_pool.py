"""The encoder replicas a decoder talks to: health tracking and least-loaded selection.

Contract: ``EncoderPool(config)`` holds one ``EncoderClient`` per URL (created in ``start()``,
inside the serving event loop). A background task per replica polls ``grpc.health.v1`` for the
encoder service every ``health_interval_s``; a replica that answered UNAVAILABLE to a call is
marked unhealthy at once. ``pick(exclude)`` returns the healthy replica with the fewest calls in
flight (round-robin among equals; replicas not yet probed count as healthy); replicas marked
unhealthy come last, after every healthy one was tried, and None means all were tried.
``Replica.busy()`` counts a call in flight.
Not here: what is sent to the encoders (media_dispatch.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from decoder_service.config import MIB, EncoderPoolConfig
from encoder_service.client import EncoderClient
from encoder_service.transport import EmbeddingImporter, ImporterConfig

log = logging.getLogger(__name__)

ENCODER_SERVICE = "glimpse.encoder.v1.Encoder"
_HEALTH_TIMEOUT_S = 5.0  # generous: a busy host answers slowly, and a miss is only a hint


class Replica:
    def __init__(self, target: str, max_message_bytes: int, importer: EmbeddingImporter) -> None:
        self.target = target
        self.client = EncoderClient(target, max_message_bytes, importer)
        self._health_channel = grpc.aio.insecure_channel(target)
        self._health = health_pb2_grpc.HealthStub(self._health_channel)
        self.healthy: bool | None = None  # None until the first probe answers
        self.in_flight = 0

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def probe(self) -> bool:
        request = health_pb2.HealthCheckRequest(service=ENCODER_SERVICE)
        try:
            reply = await self._health.Check(request, timeout=_HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            log.debug("encoder %s health check failed: %s", self.target, err.code().name)
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        await self.client.close()
        await self._health_channel.close()


class EncoderPool:
    def __init__(self, config: EncoderPoolConfig, device: str = "cpu") -> None:
        self.config = config
        self.device = device  # where fetched embeddings land (the engine's device)
        self.importer: EmbeddingImporter | None = None
        self.replicas: list[Replica] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._picks = 0  # selections so far
        self._last_pick: dict[str, int] = {}  # target -> selection number of its last pick

    def start(self) -> None:
        # One importer for all replicas: it opens and caches each same-host encoder's pool.
        importer = self.importer = EmbeddingImporter(
            ImporterConfig(
                device=self.device,
                force_path=self.config.transport,
                keep_on_device=self.config.keep_mm_feature_on_device,
                device_budget_bytes=self.config.mm_device_budget_mb * MIB,
            )
        )
        self.replicas = [
            Replica(url.removeprefix("grpc://"), self.config.max_message_bytes, importer)
            for url in self.config.encoder_urls
        ]
        self._tasks = [
            asyncio.create_task(self._watch(r), name=f"encoder-health-{r.target}")
            for r in self.replicas
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(r.close() for r in self.replicas), return_exceptions=True)
        if self.importer is not None:
            self.importer.close()

    @property
    def enabled(self) -> bool:
        return bool(self.config.encoder_urls)

    def pick(self, exclude: set[str] = frozenset()) -> Replica | None:
        """The replica to try next: healthy ones first (least loaded, then round robin).

        NOTE: a failed probe is a hint, not a verdict: a probe can time out on a busy host while
        the encoder serves fine. A replica marked unhealthy is still tried once every healthy
        one has been (the call itself then decides), so a request fails only after each
        replica really refused it.
        """
        candidates = [r for r in self.replicas if r.target not in exclude]
        if not candidates:
            return None

        def key(r: Replica) -> tuple[int, int, int, int]:
            # among equals, the one picked longest ago (round robin)
            last = self._last_pick.get(r.target, -1)
            return (1 if r.healthy is False else 0, r.in_flight, 0 if r.healthy else 1, last)

        chosen = min(candidates, key=key)
        self._picks += 1
        self._last_pick[chosen.target] = self._picks
        return chosen

    def mark_unhealthy(self, replica: Replica) -> None:
        if replica.healthy is not False:
            log.warning("encoder %s is unavailable; skipping it until it recovers", replica.target)
        replica.healthy = False

    async def _watch(self, replica: Replica) -> None:
        while True:
            healthy = await replica.probe()
            if healthy != replica.healthy:
                log.info("encoder %s is %s", replica.target, "healthy" if healthy else "unhealthy")
            replica.healthy = healthy
            await asyncio.sleep(self.config.health_interval_s)
