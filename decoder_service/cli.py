"""``glimpse decoder``: run the decoder service (LLM engine behind gRPC ``Generate``).

Contract: ``add_arguments(parser)`` declares the flags: the engine's own (``--model-path``,
``--dtype``, ``--device``, ``--load-format``, KV cache and scheduling, ``--limit-mm-per-prompt``,
``--tp`` / ``--ep``, from ``engine/cli_args.py``) plus the service's, with defaults read from ``config.py``.
``run(args)`` builds the frozen ``DecoderServiceConfig``, serves until SIGTERM/SIGINT and shuts
down gracefully (health NOT_SERVING, drain, stop with a grace period). Exit status: 0 after a
clean shutdown, 1 when the model failed to load or warm up, 2 for bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import replace

from decoder_service.config import (
    DecoderServiceConfig,
    EncoderPoolConfig,
    ServerConfig,
)
from decoder_service.engine.cli_args import add_engine_arguments, engine_config_from_args
from decoder_service.engine.config import EngineConfig
from glimpse.lifecycle import add_process_arguments, serve_until_signal

log = logging.getLogger("glimpse.decoder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    enc, srv = EncoderPoolConfig(), ServerConfig()
    add_engine_arguments(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=srv.host)
    g.add_argument("--port", type=int, default=srv.port, help="gRPC port (0: any free port)")
    g.add_argument(
        "--served-model-name",
        default=srv.served_model_name,
        help="model name clients send (default: the checkpoint directory's name)",
    )
    g.add_argument(
        "--max-waiting-requests",
        type=int,
        default=srv.max_waiting_requests,
        help="requests queued behind the running batch before RESOURCE_EXHAUSTED",
    )
    g.add_argument("--max-message-bytes", type=int, default=srv.max_message_bytes)
    g.add_argument(
        "--stats-log-interval",
        type=float,
        default=srv.stats_log_interval_s,
        help="seconds between engine throughput lines in the log (0: none)",
    )
    add_process_arguments(g, srv.metrics_port, srv.shutdown_drain_s, srv.shutdown_grace_s)
    g = parser.add_argument_group("encoders")
    g.add_argument(
        "--encoder-urls",
        default=",".join(enc.encoder_urls),
        help="comma-separated encoder gRPC targets host:port (empty: text only)",
    )
    g.add_argument(
        "--mm-per-request-timeout",
        type=float,
        default=enc.mm_per_request_timeout_s,
        help="seconds the media of one request may take (encode + fetch)",
    )
    g.add_argument(
        "--encoder-health-interval",
        type=float,
        default=enc.health_interval_s,
        help="seconds between health checks of each encoder",
    )
    g.add_argument(
        "--mm-transport",
        choices=("auto", "cuda_ipc", "shm", "grpc_stream"),
        default=enc.transport or "auto",
        help="embedding path from encoders (auto: by host identity, falling back to grpc_stream)",
    )
    g.add_argument(
        "--keep-mm-feature-on-device",
        action=argparse.BooleanOptionalAction,
        default=enc.keep_mm_feature_on_device,
        help="keep fetched vision features on the GPU until prefill used them",
    )
    g.add_argument(
        "--mm-device-budget-mb",
        type=int,
        default=enc.mm_device_budget_mb,
        help="GPU memory for fetched vision features, kept out of the KV pool; features past "
        "it wait in host memory",
    )


def config_from_args(args: argparse.Namespace) -> DecoderServiceConfig:
    urls = tuple(u.strip() for u in args.encoder_urls.split(",") if u.strip())
    return DecoderServiceConfig(
        engine=_with_reservation(engine_config_from_args(args), args),
        encoders=EncoderPoolConfig(
            encoder_urls=urls,
            mm_per_request_timeout_s=args.mm_per_request_timeout,
            health_interval_s=args.encoder_health_interval,
            max_message_bytes=args.max_message_bytes,
            transport=None if args.mm_transport == "auto" else args.mm_transport,
            keep_mm_feature_on_device=args.keep_mm_feature_on_device,
            mm_device_budget_mb=args.mm_device_budget_mb,
        ),
        server=ServerConfig(
            host=args.host,
            port=args.port,
            served_model_name=args.served_model_name,
            max_message_bytes=args.max_message_bytes,
            max_waiting_requests=args.max_waiting_requests,
            stats_log_interval_s=args.stats_log_interval,
            enable_metrics=args.enable_metrics,
            metrics_port=args.metrics_port,
            shutdown_drain_s=args.shutdown_drain_s,
            shutdown_grace_s=args.shutdown_grace_s,
        ),
    )


async def serve(config: DecoderServiceConfig) -> int:
    from decoder_service.server import DecoderServer  # heavy imports only once flags are valid

    server = DecoderServer(config)
    return await serve_until_signal(server)


def _with_reservation(engine: EngineConfig, args: argparse.Namespace) -> EngineConfig:
    """The KV pool leaves the device budget of fetched vision features free (with encoders)."""
    if not args.encoder_urls.strip() or not args.keep_mm_feature_on_device:
        return engine
    cache = replace(engine.cache, reserved_gpu_mb=args.mm_device_budget_mb)
    return replace(engine, cache=cache)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    return asyncio.run(serve(config))
