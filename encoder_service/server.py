"""The encoder replica's gRPC server: Encoder service, health, reflection, metrics, shutdown.

Contract: ``EncoderServer(config).start()`` binds the port and starts serving at once with health
``NOT_SERVING`` (for ``""`` and ``glimpse.encoder.v1.Encoder``); the vision tower is loaded in the
background and one warm-up encode runs through the whole pipeline before health flips to
``SERVING``; on a GPU a forward at the full patch budget (plus the embedding cache's size) then
leaves this process's peak reserved, so a decoder started after it sizes its KV cache around it.
Until then ``Encode`` answers UNAVAILABLE. ``stop()`` flips health to NOT_SERVING,
waits ``shutdown_drain_s`` so probes notice, then stops the server letting in-flight calls finish
within ``shutdown_grace_s``, and closes the embedding pool (readers then see it closed). Once
warm, the heap built by loading is frozen out of the garbage collector's scans (``gc.freeze``:
a full collection over it stalls encodes), and thawed again on ``stop()``.
Message size limits are set explicitly on the server (never below what a FetchEmbedding chunk
needs). The embedding store (pool) is created at construction, on the tower's device; its
transport counters are served with the encoder's metrics.
Request handling does not belong here (``servicer.py``).
"""

from __future__ import annotations

import asyncio
import gc
import io
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from PIL import Image

from encoder_service.batcher import VisionBatcher
from encoder_service.cache import EmbeddingCache
from encoder_service.config import MIB, EncoderConfig, ServerLimits
from encoder_service.items import MediaItem, Modality
from encoder_service.media.decode import MediaPreparer, model_salt
from encoder_service.metrics import EncoderMetrics
from encoder_service.pipeline import EncodePipeline
from encoder_service.servicer import EncoderServicer, add_encoder_servicer
from encoder_service.store import EmbeddingStore
from encoder_service.tower import load_tower, resolve_device
from encoder_service.transport import ExporterConfig, TransportCollector, grpc_message_options
from protos import encoder_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Encoder"].full_name
_WARMUP_TIMEOUT_S = 600.0


def message_options(limits: ServerLimits) -> list[tuple[str, int]]:
    """The server's size limits, the configured ones raised to what a stream chunk needs, and
    the stream's HTTP/2 settings."""
    chunk = dict(grpc_message_options())
    sizes = [
        (key, max(own, chunk.pop(key)))
        for key, own in (
            ("grpc.max_receive_message_length", limits.max_request_bytes),
            ("grpc.max_send_message_length", limits.max_send_bytes),
        )
    ]
    return [*sizes, *chunk.items()]


def _warmup_item() -> MediaItem:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 30, 200)).save(buf, format="PNG")
    return MediaItem(index=0, modality=Modality.IMAGE, data=buf.getvalue())


class EncoderServer:
    def __init__(self, config: EncoderConfig) -> None:
        self.config = config
        self.metrics = EncoderMetrics()
        store = config.store
        self.store = EmbeddingStore(
            ExporterConfig(
                pool_bytes=store.embedding_pool_mb * MIB,
                ttl_s=store.embedding_ttl_s,
                chunk_bytes=config.server.stream_chunk_bytes,
            ),
            spill_capacity_bytes=store.embedding_store_mb * MIB,
            device=resolve_device(config.model.device),
            transport=store.transport,
        )
        self.metrics.registry.register(TransportCollector("encoder", [self.store.stats]))
        self.cache = EmbeddingCache(config.store.mm_cache_mb * MIB)
        self.pipeline: EncodePipeline | None = None
        self.batcher: VisionBatcher | None = None
        self.health = HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: asyncio.Future[None] | None = None
        self._frozen = False  # gc.freeze() done after warm-up (undone by stop)
        self.metrics.bind_store_bytes(lambda: self.store.used_bytes)

    async def start(self) -> int:
        """Bind and serve; returns the bound port. Loading continues in the background."""
        limits = self.config.server
        server = grpc.aio.server(
            options=[
                *message_options(limits),
                ("grpc.so_reuseport", 0),
                # keepalive pings from clients every >= 20 s are fine (clients use 30 s)
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 20_000),
            ]
        )
        servicer = EncoderServicer(self.config, self.store, self.metrics, lambda: self.pipeline)
        add_encoder_servicer(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), server)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = server.add_insecure_port(f"{limits.host}:{limits.port}")
        await server.start()
        self._server = server
        if limits.enable_metrics:
            self.metrics.serve_http(limits.metrics_port, limits.host)
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._tasks = [
            loop.create_task(self._load_and_warm_up(), name="encoder-load"),
            loop.create_task(self._sweep_store(), name="encoder-store-sweep"),
        ]
        log.info(
            "encoder listening on %s:%d (loading %s); embeddings offered by %s",
            limits.host,
            self.port,
            self.config.model.model_path,
            self.store.pool_path or "grpc_stream only",
        )
        return self.port

    async def wait_ready(self) -> None:
        """Returns once SERVING; raises the load or warm-up error if loading failed."""
        assert self._ready is not None, "start() first"
        await asyncio.shield(self._ready)

    async def _load_and_warm_up(self) -> None:
        assert self._ready is not None
        try:
            tower = await asyncio.to_thread(load_tower, self.config.model)
            salt = model_salt(tower.model_config, tower.processor, self.config.store.hash_salt)
            preparer = MediaPreparer(tower.processor, self.config.media, salt, raw_patches=True)
            batcher = VisionBatcher(
                tower.encode, self.config.batch.max_batch_patches, self.metrics.observe_batch
            )
            batcher.start()
            self.batcher = batcher
            self.metrics.bind_queue_depth(lambda: batcher.queue_depth)
            pipeline = EncodePipeline(self.config, preparer, batcher, self.cache, self.metrics)
            await pipeline.encode([_warmup_item()], _WARMUP_TIMEOUT_S, use_cache=False)
            cache_bytes = self.config.store.mm_cache_mb * MIB
            reserved = await asyncio.to_thread(
                tower.reserve_memory, self.config.batch.max_batch_patches, cache_bytes
            )
            if reserved:
                log.info("GPU memory reserved at the full batch: %.2f GiB", reserved / 2**30)
        except asyncio.CancelledError:
            self._ready.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure keeps NOT_SERVING and is reported
            log.error("encoder failed to load %s: %s", self.config.model.model_path, exc)
            self._ready.set_exception(exc)
            return
        self.pipeline = pipeline
        # NOTE: what loading built (modules, the tower's parameters, the processor) lives as
        # long as the server; frozen, full collections no longer walk it. What requests
        # allocate from here on is collected as usual.
        gc.collect()
        gc.freeze()
        self._frozen = True
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("encoder ready on port %d (%s, %s)", self.port, tower.device, tower.dtype)
        self._ready.set_result(None)

    async def _sweep_store(self) -> None:
        # Frees expired embeddings while idle; every store call also sweeps on its own.
        period = max(0.5, self.config.store.embedding_ttl_s / 4)
        while True:
            await asyncio.sleep(period)
            self.store.sweep()

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful: NOT_SERVING, drain period, then stop with a grace for in-flight calls."""
        limits = self.config.server
        await self.health.enter_graceful_shutdown()
        if limits.shutdown_drain_s > 0:
            await asyncio.sleep(limits.shutdown_drain_s)
        if self._server is not None:
            await self._server.stop(limits.shutdown_grace_s if grace_s is None else grace_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.pipeline is not None:
            await self.pipeline.close()
        elif self.batcher is not None:
            await self.batcher.stop()
        self.store.close()
        if self._frozen:  # the server's objects may be garbage now: let the collector see them
            gc.unfreeze()
            self._frozen = False

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()
