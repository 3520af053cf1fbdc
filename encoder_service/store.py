"""Where finished embeddings wait until their consumers fetched and acknowledged them.

Contract: ``EmbeddingStore.put(embedding, consumers)`` keeps a host copy of the embedding under a
random id and returns a ``StoredEmbedding``; ``read(id)`` gives its bytes for ``FetchEmbedding``;
``ack(ids)`` counts one consumer per id and frees an entry when all of its consumers acked; an
entry nobody acknowledged is freed ``ttl_s`` after it was stored. ``put`` refuses with
``EncodeError(EXHAUSTED)`` when the store would exceed ``capacity_bytes``.
Every entry is readable through the grpc_stream transport. Shared-memory and CUDA IPC pools
plug in at ``put``: a pool slot becomes an extra location of the same entry, released by the same
ack/TTL rules. Single-threaded: only the event loop calls it.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from encoder_service.errors import EncodeError, ErrorKind
from encoder_service.items import StoredEmbedding


@dataclass
class _Entry:
    host: torch.Tensor  # [num_tokens, hidden] model dtype, cpu, contiguous
    data: memoryview  # the same storage as bytes (C order)
    consumers_left: int
    expires_at: float  # monotonic seconds


class EmbeddingStore:
    def __init__(
        self,
        capacity_bytes: int,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity_bytes = capacity_bytes
        self.ttl_s = ttl_s
        self.used_bytes = 0
        self._clock = clock
        # Insertion order is expiry order because every entry gets the same TTL.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, embedding: torch.Tensor, consumers: int = 1) -> StoredEmbedding:
        """Store ``embedding`` ([num_tokens, hidden]) for ``consumers`` readers."""
        self.sweep()
        host = embedding.detach().to("cpu").contiguous()
        data = memoryview(host.view(torch.uint8).reshape(-1).numpy())
        if self.used_bytes + data.nbytes > self.capacity_bytes:
            raise EncodeError(
                ErrorKind.EXHAUSTED,
                f"embedding store is full ({self.used_bytes >> 20} MiB held by unacknowledged "
                "embeddings); retry later",
            )
        embedding_id = secrets.token_hex(16)
        expires = self._clock() + self.ttl_s
        self._entries[embedding_id] = _Entry(host, data, max(1, consumers), expires)
        self.used_bytes += data.nbytes
        return StoredEmbedding(embedding_id, "grpc_stream", self.ttl_s)

    def put_all(self, embeddings: list[torch.Tensor], consumers: int = 1) -> list[StoredEmbedding]:
        """Store every embedding of one request, or none of them."""
        self.sweep()
        needed = sum(e.numel() * e.element_size() for e in embeddings)
        if self.used_bytes + needed > self.capacity_bytes:
            raise EncodeError(
                ErrorKind.EXHAUSTED,
                f"embedding store is full ({self.used_bytes >> 20} MiB held by unacknowledged "
                f"embeddings, {needed >> 20} MiB more needed); retry later",
            )
        return [self.put(e, consumers) for e in embeddings]

    def read(self, embedding_id: str) -> memoryview:
        """The embedding's bytes; raises ``EncodeError(NOT_FOUND)`` when unknown or expired."""
        self.sweep()
        entry = self._entries.get(embedding_id)
        if entry is None:
            raise EncodeError(
                ErrorKind.NOT_FOUND,
                f"embedding {embedding_id[:64]!r} is unknown, released or expired",
            )
        return entry.data

    def ack(self, embedding_ids: list[str]) -> tuple[int, int]:
        """Count one consumer per id; returns (known ids, entries freed)."""
        self.sweep()
        known = released = 0
        for embedding_id in embedding_ids:
            entry = self._entries.get(embedding_id)
            if entry is None:
                continue
            known += 1
            entry.consumers_left -= 1
            if entry.consumers_left <= 0:
                self._free(embedding_id)
                released += 1
        return known, released

    def sweep(self) -> int:
        """Free expired entries; returns how many."""
        now = self._clock()
        freed = 0
        while self._entries:
            embedding_id, entry = next(iter(self._entries.items()))
            if entry.expires_at > now:
                break
            self._free(embedding_id)
            freed += 1
        return freed

    def _free(self, embedding_id: str) -> None:
        entry = self._entries.pop(embedding_id)
        self.used_bytes -= entry.data.nbytes
