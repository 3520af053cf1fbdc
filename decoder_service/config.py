"""The decoder service's one frozen configuration object, composed from small parts.

Contract: ``DecoderServiceConfig`` = ``EngineConfig`` (weights, KV cache, scheduling, media
limits, TP/EP ranks; defined by the engine) + ``EncoderPoolConfig`` (which encoders, how media
is dispatched) + ``ServerConfig`` (gRPC port, metrics, shutdown). The CLI
takes every default from these dataclasses; tests build them directly. Nothing here parses
flags, reads the environment or touches the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from decoder_service.engine.config import EngineConfig

MIB = 1 << 20


@dataclass(frozen=True)
class EncoderPoolConfig:
    # gRPC targets ("host:port") of the encoder replicas; media items are spread over them.
    encoder_urls: tuple[str, ...] = ()
    # Whole media stage of one request (encode + fetch), seconds; the caller's deadline may cut
    # it shorter.
    mm_per_request_timeout_s: float = 60.0
    # How often each replica's grpc.health.v1 status is polled, seconds.
    health_interval_s: float = 2.0
    # Largest gRPC message to or from an encoder (raw media travels inside Encode).
    max_message_bytes: int = 128 * MIB
    # Embedding path: None = by host identity (cuda_ipc / shm on the same host, else
    # grpc_stream); or force "cuda_ipc", "shm" or "grpc_stream".
    transport: str | None = None
    # Keep fetched vision features on the decoder's device until prefill consumed them (no
    # device -> host copy); False parks them in host memory (saves GPU memory under long queues).
    keep_mm_feature_on_device: bool = True
    # ... within this many MiB of features alive on the device at once (the KV pool is sized
    # without it); the rest wait in host memory. A queue of image requests otherwise holds every
    # one's features on the GPU.
    mm_device_budget_mb: int = 2048

    def __post_init__(self) -> None:
        if self.mm_per_request_timeout_s <= 0 or self.health_interval_s <= 0:
            raise ValueError("encoder timeouts and intervals must be positive")
        if self.mm_device_budget_mb < 0:
            raise ValueError("mm_device_budget_mb must not be negative")
        if self.transport not in (None, "cuda_ipc", "shm", "grpc_stream"):
            raise ValueError(f"unknown transport {self.transport!r}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051  # 0 picks a free port (tests)
    # Name clients send as the OpenAI `model`; None = the checkpoint directory's name.
    served_model_name: str | None = None
    # gRPC receive/send limit: Generate requests may carry raw media bytes.
    max_message_bytes: int = 128 * MIB
    # Requests queued behind the running batch before new ones get RESOURCE_EXHAUSTED.
    max_waiting_requests: int = 1024
    enable_metrics: bool = False
    metrics_port: int = 9400
    # Seconds between engine throughput lines in the log; 0 turns them off.
    stats_log_interval_s: float = 10.0
    # Shutdown: NOT_SERVING is visible this long before the server stops taking calls ...
    shutdown_drain_s: float = 5.0
    # ... then in-flight Generate calls get this long to finish (together within 30 s, the
    # grace the deployments budget).
    shutdown_grace_s: float = 20.0

    def __post_init__(self) -> None:
        if self.max_waiting_requests < 1 or self.max_message_bytes < MIB:
            raise ValueError("max_waiting_requests must be >= 1 and max_message_bytes >= 1 MiB")
        if self.shutdown_drain_s < 0 or self.shutdown_grace_s < 0:
            raise ValueError("shutdown times must not be negative")
        if self.stats_log_interval_s < 0:
            raise ValueError("stats_log_interval_s must not be negative")


@dataclass(frozen=True)
class DecoderServiceConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    encoders: EncoderPoolConfig = field(default_factory=EncoderPoolConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    @property
    def model_path(self) -> str:
        return self.engine.load.model_path
