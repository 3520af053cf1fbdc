"""Internal request and result types of the encoder pipeline.

Contract: plain dataclasses passed between the servicer (via ``convert``), the pipeline, the cache
and the store. They carry no gRPC types and no behaviour beyond naming themselves in messages.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class Modality(enum.Enum):
    IMAGE = "image"
    VIDEO = "video"


@dataclass(frozen=True)
class MediaOptions:
    """Per-item processing options; 0 means the server default."""

    min_pixels: int = 0
    max_pixels: int = 0
    fps: float = 0.0  # videos only
    max_frames: int = 0  # videos only


@dataclass(frozen=True)
class MediaItem:
    index: int  # position in the request, used to name the item in errors
    modality: Modality
    data: bytes | None = None  # raw bytes, or None when ``url`` is set
    url: str | None = None  # http(s)://, data: or file:// URL
    options: MediaOptions = field(default_factory=MediaOptions)

    @property
    def label(self) -> str:
        """How error messages name this item: its index and a short, safe source description."""
        if self.url is None:
            return f"item {self.index} ({self.modality.value}, {len(self.data or b'')} raw bytes)"
        if self.url[:5].lower() == "data:":
            return f"item {self.index} ({self.modality.value}, data: URL)"
        shown = "".join(c if c.isprintable() else "?" for c in self.url[:120])
        more = "..." if len(self.url) > 120 else ""
        return f"item {self.index} ({self.modality.value}, {shown}{more})"


@dataclass(frozen=True)
class EncodedItem:
    """One item's vision embedding and the facts the prompt builder needs."""

    content_hash: str  # salted hex digest of the decoded media + processing params
    modality: Modality
    embedding: torch.Tensor  # [num_tokens, out_hidden] model dtype, cpu or the encoder's device
    grid_thw: tuple[int, int, int]  # patches before the 2x2 merge
    timestamps: tuple[float, ...]  # videos: seconds per temporal patch; images: ()
    cache_hit: bool

    @property
    def num_tokens(self) -> int:
        return int(self.embedding.shape[0])


@dataclass(frozen=True)
class StoredEmbedding:
    """Where an embedding waits until it is fetched and acknowledged."""

    embedding_id: str
    transport: str  # "grpc_stream" today; pool transports add their own
    ttl_s: float


@dataclass(frozen=True)
class EmbeddingDescriptor:
    """A client's view of one Encode reply item (mirrors ``EmbeddingDescriptor`` in the proto)."""

    content_hash: str
    num_tokens: int
    grid_thw: tuple[int, int, int]
    timestamps: tuple[float, ...]
    modality: Modality
    cache_hit: bool
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]  # [num_tokens, hidden]
    nbytes: int
    embedding_id: str
    transport: str  # "grpc_stream"
    ttl_s: float
