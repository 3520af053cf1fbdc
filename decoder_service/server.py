"""The decoder's gRPC server: Decoder service, health, reflection, metrics, load, shutdown.

Contract: ``DecoderServer(config).start()`` binds the port at once with health NOT_SERVING (for
``""`` and ``glimpse.decoder.v1.Decoder``) and loads the model in a background thread; a warm-up
generation runs through the engine loop before health flips to SERVING. Until then every RPC
answers UNAVAILABLE. ``wait_ready()`` returns once serving (raises if loading failed).
``stop()`` flips health to NOT_SERVING, waits ``shutdown_drain_s`` so probes notice, stops the
server letting in-flight calls finish within ``shutdown_grace_s`` (the rest are cancelled, which
aborts them), then stops the engine loop and closes the encoder channels. Message size limits
are raised explicitly (requests may carry raw media). Metrics are served on their own port.
Once warm, the heap built by loading (modules, weights' Python objects, the KV block pool) is
frozen out of the garbage collector's scans (``gc.freeze``), and thawed again on ``stop()``.
Not here: request handling (servicer.py), flags (cli.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from decoder_service import convert
from decoder_service.config import DecoderServiceConfig
from decoder_service.encoder_pool import EncoderPool
from decoder_service.engine.cli_args import resolve_device
from decoder_service.engine.sampling_params import SamplingParams
from decoder_service.engine_loop import EngineLoop, EngineRequest
from decoder_service.media_dispatch import MediaDispatcher
from decoder_service.metrics import DecoderMetrics, StepLog
from decoder_service.model_host import LoadedModel, load_engine
from decoder_service.servicer import DecoderServicer, Runtime
from decoder_service.token_text import TokenText
from encoder_service.transport.metrics import TransportCollector
from protos import decoder_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_WARMUP_TIMEOUT_S = 600.0


class DecoderServer:
    def __init__(self, config: DecoderServiceConfig) -> None:
        self.config = config
        self.health = HealthServicer()
        self.runtime: Runtime | None = None
        self.metrics: DecoderMetrics | None = None
        interval = config.server.stats_log_interval_s
        self._step_log = StepLog(interval) if interval > 0 else None
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        device = resolve_device(config.engine.load.device)
        self._pool = EncoderPool(config.encoders, str(device))
        self._loaded: LoadedModel | None = None
        self._ready: asyncio.Future[None] | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._frozen = False  # gc.freeze() done after warm-up (undone by stop)

    @property
    def served_model_name(self) -> str:
        path = self.config.model_path
        return self.config.server.served_model_name or Path(path).name or path

    async def start(self) -> int:
        """Bind and serve; returns the bound port. Loading continues in the background."""
        limits = self.config.server
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limits.max_message_bytes),
                ("grpc.max_send_message_length", limits.max_message_bytes),
                ("grpc.so_reuseport", 0),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 20_000),
            ]
        )
        pb_grpc.add_DecoderServicer_to_server(DecoderServicer(lambda: self.runtime), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (
            convert.SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = server.add_insecure_port(f"{limits.host}:{limits.port}")
        await server.start()
        self._server = server
        self._pool.start()
        if limits.enable_metrics:
            self.metrics = DecoderMetrics(self.served_model_name)
            if self._pool.importer is not None:
                # which path each embedding took, and pools that could not be opened
                self.metrics.registry.register(
                    TransportCollector("decoder", [self._pool.importer.stats])
                )
            self.metrics.serve_http(limits.metrics_port, limits.host)
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._load_task = loop.create_task(self._load_and_warm_up(), name="decoder-load")
        log.info(
            "decoder listening on %s:%d (loading %s)",
            limits.host,
            self.port,
            self.config.model_path,
        )
        return self.port

    async def wait_ready(self) -> None:
        assert self._ready is not None, "start() first"
        await asyncio.shield(self._ready)

    async def _set_health(self, status: int) -> None:
        for name in ("", convert.SERVICE_NAME):
            await self.health.set(name, status)

    async def _load_and_warm_up(self) -> None:
        assert self._ready is not None
        try:
            loaded = await asyncio.to_thread(load_engine, self.config)
            self._loaded = loaded
            runtime = self._build_runtime(loaded)
            runtime.loop.start()
            await asyncio.wait_for(_warm_up(runtime), _WARMUP_TIMEOUT_S)
            # NOTE: a full collection walks every tracked object: with the loaded process's
            # heap (hundreds of thousands of objects, one KVBlock per KV block) one took over
            # 100 ms, stalling the engine thread mid-step. Frozen objects are never scanned;
            # what requests allocate from here on is collected as usual.
            gc.collect()
            gc.freeze()
            self._frozen = True
        except asyncio.CancelledError:
            self._ready.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure keeps NOT_SERVING and is reported
            log.error("decoder failed to load %s: %s", self.config.model_path, exc)
            self._ready.set_exception(exc)
            return
        self.runtime = runtime
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("decoder ready on port %d (%s)", self.port, self.served_model_name)
        self._ready.set_result(None)

    def _build_runtime(self, loaded: LoadedModel) -> Runtime:
        engine, cfg = loaded.engine, self.config
        media = cfg.engine.media
        tokenizer = loaded.processor.tokenizer
        token_text = TokenText(tokenizer)
        observers = [o.observe_step for o in (self.metrics, self._step_log) if o is not None]

        def on_step(stats, outputs) -> None:
            for observe in observers:
                observe(stats, outputs)

        loop = EngineLoop(
            engine,
            lambda tid, skip: tokenizer.decode([tid], skip_special_tokens=skip),
            on_step if observers else None,
        )
        modalities = ("text", "image", "video") if self._pool.enabled else ("text",)
        model = convert.ServedModel(
            served_model_name=self.served_model_name,
            model_type=loaded.model_config.model_type,
            max_model_len=engine.max_model_len,
            vocab_size=loaded.model_config.text.vocab_size,
            modalities=modalities,
            max_images_per_prompt=media.max_images,
            max_videos_per_prompt=media.max_videos,
            eos_token_ids=tuple(loaded.model_config.text.eos_token_ids),
        )
        return Runtime(
            loop=loop,
            dispatcher=MediaDispatcher(loaded.processor, self._pool, media),
            tokenizer=tokenizer,
            token_text=token_text,
            model=model,
            mm_timeout_s=cfg.encoders.mm_per_request_timeout_s,
            max_active=cfg.engine.scheduler.max_running_requests + cfg.server.max_waiting_requests,
            kv_capacity=engine.kv.num_blocks * cfg.engine.cache.block_size,
            metrics=self.metrics,
        )

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful: NOT_SERVING, drain period, stop with a grace, then the engine."""
        limits = self.config.server
        await self.health.enter_graceful_shutdown()
        if limits.shutdown_drain_s > 0 and grace_s is None:
            await asyncio.sleep(limits.shutdown_drain_s)
        if self._server is not None:
            await self._server.stop(limits.shutdown_grace_s if grace_s is None else grace_s)
        if self._load_task is not None:
            self._load_task.cancel()
            await asyncio.gather(self._load_task, return_exceptions=True)
        if self.runtime is not None:
            await self.runtime.loop.stop()
        if self._loaded is not None:
            self._loaded.close()
        await self._pool.close()
        if self._frozen:  # the engine's objects may be garbage now: let the collector see them
            gc.unfreeze()
            self._frozen = False


async def _warm_up(rt: Runtime) -> None:
    """One short greedy generation through the whole loop (first-call costs happen here)."""
    ids = rt.tokenizer.encode("Hello", add_special_tokens=False).ids or [0]
    request = EngineRequest("warmup", ids, SamplingParams(max_tokens=2, temperature=0.0))
    stream = await rt.loop.submit(request)
    while not stream.finished:
        await stream.next()
