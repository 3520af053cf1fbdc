"""Where finished embeddings wait until their readers fetched and acknowledged them.

Contract: ``EmbeddingStore`` is the encoder's face of the transport's ``EmbeddingExporter``: ONE
preallocated pool per encoder (``cuda_ipc`` for a GPU tower, ``shm`` otherwise, none with
``transport="grpc_stream"``) whose slots are offered to readers on this host, and host memory for
items offered only by stream (pool full, reader on another host, no pool).
``put_all(embeddings, consumers, consumer_host)`` stores every item of one request or none of them
and returns one ``EmbeddingLocation`` per item; it refuses with ``EncodeError(EXHAUSTED)`` when the
host memory held for streamed items would exceed ``spill_capacity_bytes`` (a full pool alone is
never an error). ``stream(id, chunk_bytes, frame)`` yields any live item's chunks for
``FetchEmbedding``, each passed through ``frame`` (the servicer's wire writer); ``ack`` counts
one reader per id and frees an item when all of them acked; an item nobody acknowledged is freed
``ttl_s`` after it was stored (``sweep``, also run by every put).

Errors: an id that is malformed, unknown, released or expired is ``EncodeError(NOT_FOUND)``
before the first chunk; an item freed while it is streamed raises the transport's
``StaleSlotError`` between chunks. gRPC and proto conversion do not belong here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

from encoder_service.errors import EncodeError, ErrorKind
from encoder_service.transport import (
    EmbeddingChunk,
    EmbeddingExporter,
    EmbeddingLocation,
    ExporterConfig,
    HostIdentity,
    TransportError,
    TransportStats,
)
from encoder_service.transport.metrics import POOL_USED_BYTES
from encoder_service.transport.stream import copy_chunk

log = logging.getLogger(__name__)

_SHM_DIR = "/dev/shm"
Framed = TypeVar("Framed")


def _fit_shm_pool(pool_bytes: int) -> int:
    """The shm pool size to use: at most half of the free space of /dev/shm.

    NOTE: a shared-memory segment is sparse: creating one larger than the tmpfs under it succeeds,
    and the process dies of SIGBUS only when a write reaches a page that cannot be backed. A small
    /dev/shm (64 MiB is a common container default) must shrink the pool up front instead.
    """
    if pool_bytes == 0 or not os.path.isdir(_SHM_DIR):
        return pool_bytes
    try:
        free = shutil.disk_usage(_SHM_DIR).free
    except OSError:
        return pool_bytes
    if pool_bytes <= free // 2:
        return pool_bytes
    fitted = free // 2
    log.warning(
        "embedding pool of %d MiB does not fit %s (%d MiB free): using %d MiB; raise the shm size"
        " (or share the host's IPC namespace) for a larger pool",
        pool_bytes >> 20,
        _SHM_DIR,
        free >> 20,
        fitted >> 20,
    )
    return fitted


class EmbeddingStore:
    def __init__(
        self,
        exporter_config: ExporterConfig,
        spill_capacity_bytes: int,
        device: torch.device | str = "cpu",
        transport: str = "auto",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        device = torch.device(device)
        if transport == "cuda_ipc" and device.type != "cuda":
            raise ValueError(
                f"transport cuda_ipc needs a CUDA device, the encoder runs on {device}"
            )
        pool_device = device if transport in ("auto", "cuda_ipc") else torch.device("cpu")
        pool_bytes = 0 if transport == "grpc_stream" else exporter_config.pool_bytes
        if pool_device.type != "cuda":
            pool_bytes = _fit_shm_pool(pool_bytes)
        config = dataclasses.replace(exporter_config, pool_bytes=pool_bytes)
        self.exporter = EmbeddingExporter(config, pool_device, clock)
        self.spill_capacity_bytes = spill_capacity_bytes
        self.ttl_s = config.ttl_s

    @property
    def stats(self) -> TransportStats:
        return self.exporter.stats

    @property
    def host(self) -> HostIdentity:
        return self.exporter.host

    @property
    def pool_path(self) -> str | None:
        """ "cuda_ipc" or "shm" when a pool is offered, None when every item is streamed."""
        return self.exporter.pool_path

    @property
    def used_bytes(self) -> int:
        """Bytes held by live items: pool slots (whole blocks) plus streamed-only host copies."""
        gauges = self.exporter.stats.gauges
        pool_used = gauges[POOL_USED_BYTES]() if self.pool_path else 0
        return int(pool_used) + self.exporter.spilled_bytes

    def put_all(
        self,
        embeddings: Sequence[torch.Tensor],  # each [num_tokens, hidden] model dtype, any device
        consumers: int = 1,
        consumer_host: HostIdentity | None = None,
    ) -> list[EmbeddingLocation]:
        """Store every embedding of one request for ``consumers`` readers, or none of them."""
        self.exporter.sweep_expired()
        stored: list[EmbeddingLocation] = []
        try:
            for embedding in embeddings:
                loc = self.exporter.put(embedding, max(1, consumers), consumer_host)
                stored.append(loc)
                spilled = self.exporter.spilled_bytes
                if loc.path == "grpc_stream" and spilled > self.spill_capacity_bytes:
                    raise EncodeError(
                        ErrorKind.EXHAUSTED,
                        f"embedding store is full ({spilled >> 20} MiB of streamed embeddings "
                        "wait for their readers and the pool has no room); retry later",
                    )
        except BaseException:
            # NOTE: also on cancellation: a refused or abandoned request must not hold slots.
            for loc in stored:
                self.exporter.release(loc)
            raise
        return stored

    def stream(
        self,
        embedding_id: str,
        chunk_bytes: int = 0,
        frame: Callable[[EmbeddingChunk], Framed] = copy_chunk,  # type: ignore[assignment]
    ) -> Iterator[Framed]:
        """The item's bytes as bounded chunks, each through ``frame`` (which gets a view of the
        item's memory and copies what it keeps; by default a chunk owning its bytes);
        NOT_FOUND on the first step if the item is not live."""
        chunks = self.exporter.stream_chunks(embedding_id, chunk_bytes or None, frame)
        try:
            first = next(chunks)  # the exporter checks the id on the first step
        except TransportError:
            raise EncodeError(
                ErrorKind.NOT_FOUND,
                f"embedding {embedding_id[:96]!r} is unknown, released or expired",
            ) from None
        yield first
        yield from chunks

    def ack(self, embedding_ids: Sequence[str], consumer: str | None = None) -> tuple[int, int]:
        """Count one reader per id; returns (ids naming a live item, items freed)."""
        known = released = 0
        for embedding_id in embedding_ids:
            try:
                outcome = self.exporter.ack(embedding_id, consumer)
            except TransportError:  # a malformed id names nothing
                continue
            known += int(outcome.known)
            released += int(outcome.released)
        return known, released

    def sweep(self) -> int:
        """Free expired items; returns how many."""
        return self.exporter.sweep_expired()

    def close(self) -> None:
        """Free everything and unlink the pool (readers see it closed from now on)."""
        self.exporter.close()
