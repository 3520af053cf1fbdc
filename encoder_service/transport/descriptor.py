"""Where an embedding lives: the descriptor an encoder hands to a decoder.

``EmbeddingLocation`` is what ``EmbeddingExporter.put`` returns and ``EmbeddingImporter.fetch``
takes. It travels inside the encoder's gRPC reply; ``to_dict``/``from_dict`` are the conversion
seam (the servicer maps the dict onto proto fields). ``embedding_id`` packs pool id, slot id and
generation into one opaque string for ``FetchEmbedding`` and ``Ack``.

Validation here is structural only (known path and dtype, nbytes == prod(shape) * itemsize, sane
ids). Whether the offset lies inside the pool and the slot is still live is checked by the
importer against the pool itself.

Not here: pools, slot bookkeeping, transfer code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from encoder_service.transport.errors import DescriptorError
from encoder_service.transport.host import HostIdentity

TransportPath = Literal["cuda_ipc", "shm", "grpc_stream"]
PATHS: tuple[TransportPath, ...] = ("cuda_ipc", "shm", "grpc_stream")

# Embedding dtypes the transport accepts, by the name on the wire (torch name without "torch.").
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}

# Slot id of an embedding that lives outside the pool (pool full, or pool-less exporter).
SPILL_SLOT = -1


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise DescriptorError(f"dtype {dtype} is not an embedding dtype (one of {sorted(DTYPES)})")


@dataclass(frozen=True)
class EmbeddingKey:
    """The identity of one stored embedding; ``str(key)`` is the wire ``embedding_id``."""

    pool_id: str
    slot_id: int  # first block of the slot in the pool, SPILL_SLOT when not in the pool
    generation: int  # unique per stored item; a slot's current generation proves it is live

    def __str__(self) -> str:
        return f"{self.pool_id}:{self.slot_id}:{self.generation}"

    @classmethod
    def parse(cls, embedding_id: str) -> EmbeddingKey:
        parts = embedding_id.rsplit(":", 2)
        try:
            pool_id, slot_id, generation = parts[0], int(parts[1]), int(parts[2])
        except (IndexError, ValueError):
            raise DescriptorError(f"malformed embedding id {embedding_id!r}") from None
        if not pool_id or slot_id < SPILL_SLOT or generation <= 0:
            raise DescriptorError(f"malformed embedding id {embedding_id!r}")
        return cls(pool_id=pool_id, slot_id=slot_id, generation=generation)


@dataclass(frozen=True)
class EmbeddingLocation:
    path: TransportPath  # how the producer offers it; the importer may still choose grpc_stream
    key: EmbeddingKey
    host: HostIdentity  # the producer's host
    offset: int  # byte offset of the tensor in the pool's data region (0 for spilled items)
    nbytes: int
    dtype: str  # a key of DTYPES
    shape: tuple[int, ...]  # [num_tokens, hidden]
    ttl_s: float = 0.0  # seconds the producer keeps it without an ack (informative)

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise DescriptorError(f"unknown transport path {self.path!r}")
        if self.dtype not in DTYPES:
            raise DescriptorError(f"unknown embedding dtype {self.dtype!r}")
        if any(d < 0 for d in self.shape):
            raise DescriptorError(f"negative dimension in shape {self.shape}")
        itemsize = DTYPES[self.dtype].itemsize
        if self.nbytes != math.prod(self.shape) * itemsize:
            raise DescriptorError(
                f"nbytes {self.nbytes} does not match shape {self.shape} of {self.dtype}"
            )
        if self.offset < 0:
            raise DescriptorError(f"negative offset {self.offset}")
        if self.path != "grpc_stream" and self.key.slot_id == SPILL_SLOT:
            raise DescriptorError(f"{self.path} descriptor without a pool slot")

    @property
    def embedding_id(self) -> str:
        return str(self.key)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-able form; the servicer copies these onto its proto fields."""
        return {
            "embedding_id": self.embedding_id,
            "transport": self.path,
            "host_id": self.host.key,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "ttl_s": self.ttl_s,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbeddingLocation:
        """Inverse of ``to_dict``; raises DescriptorError on anything malformed."""
        try:
            host = HostIdentity.from_key(str(d["host_id"]))
            return cls(
                path=d["transport"],
                key=EmbeddingKey.parse(str(d["embedding_id"])),
                host=host,
                offset=int(d["offset"]),
                nbytes=int(d["nbytes"]),
                dtype=str(d["dtype"]),
                shape=tuple(int(x) for x in d["shape"]),
                ttl_s=float(d.get("ttl_s", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DescriptorError(f"malformed embedding location: {e}") from None
