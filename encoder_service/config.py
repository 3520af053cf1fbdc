"""Frozen configuration of one encoder replica, composed from small parts.

Contract: ``EncoderConfig`` holds every knob of the encoder service; the CLI builds it from flags
whose defaults are read from these dataclasses, tests build it directly. Nothing here parses
arguments, reads the environment or touches the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1 << 20
# How the encoder offers embeddings: "auto" = a pool of its device's kind (cuda_ipc on a GPU, shm
# on the CPU); "cuda_ipc" = a GPU pool, refused on a CPU device; "shm" = a shared-memory pool even
# for a GPU tower (one device->host copy per item); "grpc_stream" = no pool, every item streamed.
TRANSPORTS = ("auto", "cuda_ipc", "shm", "grpc_stream")


@dataclass(frozen=True)
class ModelLoad:
    model_path: str = ""
    device: str = "auto"  # "auto" picks cuda when available, else cpu
    dtype: str = "auto"  # "auto" takes the checkpoint's dtype (float32 on cpu)
    load_format: str = "auto"  # "auto" (safetensors) or "dummy" (random weights)


@dataclass(frozen=True)
class MediaLimits:
    """What media the encoder accepts and how it fetches it (the SSRF and local-file rules)."""

    allowed_local_media_path: str | None = None  # file:// refused unless set
    allow_private_media_urls: bool = False  # test-only: permits loopback/private addresses
    allowed_media_domains: tuple[str, ...] = ()  # empty = any public host
    media_fetch_timeout_s: float = 10.0  # DNS, connect, each read, and the whole download
    # PEM file of CA certificates trusted for https media instead of the system store (None =
    # system store). Certificates and host names are always verified.
    media_ca_bundle: str | None = None
    max_media_bytes: int = 64 * MIB  # per item, for every source kind
    max_redirects: int = 3
    max_image_pixels: int = 40_000_000  # decode-time bomb limit (per image / per video frame)
    max_video_frames: int = 640  # most frames sampled from one video


@dataclass(frozen=True)
class BatchLimits:
    max_batch_patches: int = 65536  # patch budget of one packed ViT forward
    mm_max_concurrent_calls: int = 32  # items fetched/decoded at once; more wait in line
    mm_per_request_timeout_s: float = 60.0  # whole Encode call, fetch to reply
    max_items_per_request: int = 64


@dataclass(frozen=True)
class StoreLimits:
    mm_cache_mb: int = 1024  # embedding cache (0 disables)
    embedding_ttl_s: float = 60.0  # an unacknowledged embedding is freed after this
    # Host memory for embeddings offered only by stream (pool full, reader on another host, no
    # pool); beyond it Encode answers RESOURCE_EXHAUSTED.
    embedding_store_mb: int = 8192
    embedding_pool_mb: int = 1024  # the one preallocated same-host pool (0 = stream everything)
    transport: str = "auto"  # one of TRANSPORTS
    hash_salt: str = ""  # mixed into content hashes with the model/processor identity

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {self.transport!r}")
        if self.embedding_pool_mb < 0 or self.embedding_store_mb < 0:
            raise ValueError("embedding pool and store sizes must not be negative")
        if self.embedding_ttl_s <= 0:
            raise ValueError("embedding TTL must be positive")


@dataclass(frozen=True)
class ServerLimits:
    host: str = "0.0.0.0"
    port: int = 50061  # 0 picks a free port (tests)
    max_request_bytes: int = 128 * MIB  # gRPC receive limit (raw media travels inside Encode)
    max_send_bytes: int = 8 * MIB  # gRPC send limit; FetchEmbedding chunks stay far below it
    stream_chunk_bytes: int = 1 * MIB  # default FetchEmbedding chunk
    enable_metrics: bool = False
    metrics_port: int = 9461
    shutdown_drain_s: float = 0.0  # NOT_SERVING is visible this long before the server stops
    shutdown_grace_s: float = 10.0  # in-flight calls get this long to finish


@dataclass(frozen=True)
class EncoderConfig:
    model: ModelLoad = field(default_factory=ModelLoad)
    media: MediaLimits = field(default_factory=MediaLimits)
    batch: BatchLimits = field(default_factory=BatchLimits)
    store: StoreLimits = field(default_factory=StoreLimits)
    server: ServerLimits = field(default_factory=ServerLimits)
