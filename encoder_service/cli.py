"""``glimpse encoder``: run one encoder replica (vision tower only, no LLM weights).

Contract: ``add_arguments(parser)`` declares the flags (defaults read from ``EncoderConfig``),
``run(args)`` builds the config, serves until SIGTERM/SIGINT and shuts down gracefully (health
NOT_SERVING, drain, stop with a grace period). Exit status: 0 after a clean shutdown, 1 when the
model failed to load or warm up, 2 for bad flags.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl

from encoder_service.config import (
    TRANSPORTS,
    BatchLimits,
    EncoderConfig,
    MediaLimits,
    ModelLoad,
    ServerLimits,
    StoreLimits,
)
from encoder_service.media.local_file import allowed_root
from glimpse.lifecycle import add_process_arguments, serve_until_signal

log = logging.getLogger("glimpse.encoder")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m, media, b, s, srv = ModelLoad(), MediaLimits(), BatchLimits(), StoreLimits(), ServerLimits()
    g = parser.add_argument_group("model")
    g.add_argument("--model-path", required=True, help="checkpoint directory (HF format)")
    g.add_argument("--device", default=m.device, help="cpu, cuda, cuda:N or auto")
    g.add_argument("--dtype", default=m.dtype, help="auto, bfloat16, float16 or float32")
    g.add_argument("--load-format", default=m.load_format, choices=("auto", "safetensors", "dummy"))
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=srv.host)
    g.add_argument("--port", type=int, default=srv.port)
    add_process_arguments(g, srv.metrics_port, srv.shutdown_drain_s, srv.shutdown_grace_s)
    g = parser.add_argument_group("batching")
    g.add_argument(
        "--max-batch-patches",
        type=int,
        default=b.max_batch_patches,
        help="patch budget of one vision tower forward",
    )
    g.add_argument(
        "--mm-max-concurrent-calls",
        type=int,
        default=b.mm_max_concurrent_calls,
        help="media items fetched/decoded at once; more wait in line",
    )
    g.add_argument(
        "--mm-per-request-timeout",
        type=float,
        default=b.mm_per_request_timeout_s,
        help="seconds an Encode call may take",
    )
    g.add_argument("--max-items-per-request", type=int, default=b.max_items_per_request)
    g = parser.add_argument_group("embeddings")
    g.add_argument("--mm-cache-mb", type=int, default=s.mm_cache_mb, help="0 disables the cache")
    g.add_argument(
        "--embedding-pool-mb",
        type=int,
        default=s.embedding_pool_mb,
        help="the one preallocated same-host embedding pool (GPU memory for cuda_ipc, shared"
        " memory for shm); 0 streams every embedding",
    )
    g.add_argument(
        "--transport",
        default=s.transport,
        choices=TRANSPORTS,
        help="how embeddings are offered: auto (a pool of the device's kind: cuda_ipc on a GPU,"
        " shm on the CPU), cuda_ipc, shm, or grpc_stream (no pool); readers on other hosts, items"
        " that do not fit the pool and readers that cannot open it always get grpc_stream",
    )
    g.add_argument(
        "--embedding-store-mb",
        type=int,
        default=s.embedding_store_mb,
        help="host memory for embeddings offered only by grpc_stream (pool full, reader on another"
        " host, no pool); beyond it Encode answers RESOURCE_EXHAUSTED",
    )
    g.add_argument(
        "--embedding-ttl-s",
        type=float,
        default=s.embedding_ttl_s,
        help="an unacknowledged embedding is freed after this many seconds",
    )
    g.add_argument("--hash-salt", default=s.hash_salt, help="extra salt for content hashes")
    g = parser.add_argument_group("media")
    g.add_argument(
        "--allowed-local-media-path",
        default=media.allowed_local_media_path,
        help="directory file:// URLs may read from (file:// is refused without it)",
    )
    g.add_argument(
        "--allow-private-media-urls",
        action="store_true",
        help="TESTING ONLY: allow URLs resolving to loopback/private addresses",
    )
    g.add_argument(
        "--allowed-media-domains",
        nargs="*",
        default=list(media.allowed_media_domains),
        help="if given, only these hosts (and their subdomains) may be fetched",
    )
    g.add_argument(
        "--media-fetch-timeout",
        type=float,
        default=media.media_fetch_timeout_s,
        help="seconds one media download may take: DNS, connect and body together",
    )
    g.add_argument(
        "--media-ca-bundle",
        default=media.media_ca_bundle,
        help="PEM file of CA certificates trusted for https media URLs instead of the system"
        " store (certificates and host names are always verified)",
    )
    g.add_argument("--max-media-bytes", type=int, default=media.max_media_bytes)
    g.add_argument("--max-redirects", type=int, default=media.max_redirects)
    g.add_argument(
        "--max-image-pixels",
        type=int,
        default=media.max_image_pixels,
        help="decoded pixels per image or video frame (decompression bomb limit)",
    )
    g.add_argument("--max-video-frames", type=int, default=media.max_video_frames)


def config_from_args(args: argparse.Namespace) -> EncoderConfig:
    return EncoderConfig(
        model=ModelLoad(args.model_path, args.device, args.dtype, args.load_format),
        media=MediaLimits(
            allowed_local_media_path=args.allowed_local_media_path,
            allow_private_media_urls=args.allow_private_media_urls,
            allowed_media_domains=tuple(d.lower() for d in args.allowed_media_domains),
            media_fetch_timeout_s=args.media_fetch_timeout,
            media_ca_bundle=args.media_ca_bundle,
            max_media_bytes=args.max_media_bytes,
            max_redirects=args.max_redirects,
            max_image_pixels=args.max_image_pixels,
            max_video_frames=args.max_video_frames,
        ),
        batch=BatchLimits(
            max_batch_patches=args.max_batch_patches,
            mm_max_concurrent_calls=args.mm_max_concurrent_calls,
            mm_per_request_timeout_s=args.mm_per_request_timeout,
            max_items_per_request=args.max_items_per_request,
        ),
        store=StoreLimits(
            mm_cache_mb=args.mm_cache_mb,
            embedding_ttl_s=args.embedding_ttl_s,
            embedding_store_mb=args.embedding_store_mb,
            embedding_pool_mb=args.embedding_pool_mb,
            transport=args.transport,
            hash_salt=args.hash_salt,
        ),
        server=ServerLimits(
            host=args.host,
            port=args.port,
            enable_metrics=args.enable_metrics,
            metrics_port=args.metrics_port,
            shutdown_drain_s=args.shutdown_drain_s,
            shutdown_grace_s=args.shutdown_grace_s,
        ),
    )


async def serve(config: EncoderConfig) -> int:
    from encoder_service.server import EncoderServer  # heavy imports only once flags are valid

    try:
        server = EncoderServer(config)
    except ValueError as exc:  # a transport the device cannot offer (cuda_ipc on a CPU)
        log.error("%s", exc)
        return 2
    return await serve_until_signal(server)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if config.media.allowed_local_media_path is not None:
        try:
            allowed_root(config.media.allowed_local_media_path)
        except ValueError as exc:
            log.error("%s", exc)
            return 2
    if config.media.media_ca_bundle is not None:
        from encoder_service.media.fetch import tls_context

        try:
            tls_context(config.media.media_ca_bundle)
        except (OSError, ssl.SSLError):
            log.error(
                "--media-ca-bundle %s is not a readable PEM file", config.media.media_ca_bundle
            )
            return 2
    if config.media.allow_private_media_urls:
        log.warning("--allow-private-media-urls is set: media URLs may reach internal addresses")
    return asyncio.run(serve(config))
