"""Encoder side of the embedding transport: store an embedding, describe it, serve it, free it.

One ``EmbeddingExporter`` per encoder process (per device). It owns ONE preallocated pool, a
``cuda_ipc`` pool when the device is a GPU and an ``shm`` pool otherwise, and a slot allocator
over it. ``put`` copies an embedding into a slot and returns its ``EmbeddingLocation``; when the
pool is full (or the consumer is known to be on another host, or the pool size is 0) the bytes
are kept in host memory instead and the location says ``grpc_stream``. That fallback is never an
error; it is counted in ``stats.pool_fallbacks``.

Lifetime: an item is freed when ``consumers`` acks arrived (``ack``), or when its TTL runs out
(``sweep_expired``, run by every ``put``; worth a timer too when puts are rare), or at once by
``release`` (a service undoing the puts of a request it refuses).
``stream_chunks`` serves any live item, pooled or not, as bounded chunks for the
``FetchEmbedding`` RPC (each one handed to a ``frame`` function while it still views the item's
memory, so the caller's reply message can be the payload's only copy), and fails with
``StaleSlotError`` when the item is gone or is freed while it is being read.

Thread safety: every method may be called from any thread (one lock around the bookkeeping;
copies run outside it).

Not here: gRPC servicers and proto conversion (the encoder service), reading on the decoder side
(importer.py).
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from encoder_service.transport import metrics
from encoder_service.transport.control_block import ControlBlock
from encoder_service.transport.cuda_ipc_pool import CudaIpcPool
from encoder_service.transport.descriptor import (
    SPILL_SLOT,
    EmbeddingKey,
    EmbeddingLocation,
    dtype_name,
)
from encoder_service.transport.errors import StaleSlotError
from encoder_service.transport.host import HostIdentity, local_host, pid_namespace
from encoder_service.transport.shm_pool import ShmPool, as_bytes
from encoder_service.transport.slots import AckOutcome, Lease, SlotAllocator
from encoder_service.transport.stream import EmbeddingChunk, chunk_views, copy_chunk

Framed = TypeVar("Framed")


@dataclass(frozen=True)
class ExporterConfig:
    pool_bytes: int = 1 << 30  # size of the one preallocated pool; 0 = stream every item
    block_bytes: int = 64 << 10  # slot alignment and allocation granularity
    ttl_s: float = 30.0  # an unacked item is freed after this long
    chunk_bytes: int = 4 << 20  # default grpc_stream chunk size
    stream_checksum: bool = True  # CRC32 per chunk (costs ~1 ms per MiB per side on slow cores)
    ipc_library: str | None = None  # "cupy" | "torch"; None prefers cupy when importable

    def __post_init__(self) -> None:
        if self.pool_bytes < 0 or self.block_bytes <= 0 or self.ttl_s <= 0:
            raise ValueError("pool_bytes >= 0, block_bytes > 0 and ttl_s > 0 are required")
        if self.ipc_library not in (None, "cupy", "torch"):
            raise ValueError(f"unknown IPC library {self.ipc_library!r}")


class _Pool(Protocol):
    kind: str
    control: ControlBlock

    def write(self, offset: int, src: torch.Tensor) -> None: ...
    def read(self, offset: int, nbytes: int) -> memoryview: ...
    def close(self) -> None: ...


@dataclass
class _Spilled:
    data: bytes
    lease: Lease


class EmbeddingExporter:
    def __init__(
        self,
        config: ExporterConfig = ExporterConfig(),
        device: torch.device | str = "cpu",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.host = local_host()
        # Unique per process start, so a restarted encoder never reuses a name a decoder cached.
        self.pool_id = f"glimpse-{os.getpid()}-{secrets.token_hex(4)}"
        self.stats = metrics.TransportStats()
        self._clock = clock
        self._lock = threading.Lock()
        self._generations = itertools.count(1)
        self._spilled: dict[int, _Spilled] = {}
        self._spill_expired = 0
        self._pool: _Pool | None = None
        self._slots: SlotAllocator | None = None
        num_blocks = config.pool_bytes // config.block_bytes
        if num_blocks > 0:
            self._open_pool(num_blocks * config.block_bytes)
        self.stats.gauges[metrics.SPILLED_BYTES] = lambda: self.spilled_bytes

    def _open_pool(self, data_bytes: int) -> None:
        meta = {"owner_pid": os.getpid(), "pid_ns": pid_namespace(), "host_id": self.host.key}
        block = self.config.block_bytes
        if self.device.type == "cuda":
            pool: ShmPool | CudaIpcPool = CudaIpcPool(
                self.pool_id, data_bytes, block, meta, self.device, self.config.ipc_library
            )
        else:
            pool = ShmPool(self.pool_id, data_bytes, block, meta)
        control = pool.control
        self._pool = pool
        self._slots = SlotAllocator(
            control.num_blocks, block, control.generations, control.lengths, self._clock
        )
        slots = self._slots
        self.stats.gauges[metrics.POOL_CAPACITY_BYTES] = lambda: data_bytes
        self.stats.gauges[metrics.POOL_USED_BYTES] = lambda: slots.used_blocks * block

    @property
    def pool_path(self) -> str | None:
        """The same-host path this exporter offers ("cuda_ipc" or "shm"), None without a pool."""
        return self._pool.kind if self._pool is not None else None

    @property
    def spilled_bytes(self) -> int:
        """Host memory held by items offered only by stream (pool full, other host, no pool)."""
        with self._lock:
            return sum(len(s.data) for s in self._spilled.values())

    # -- store ---------------------------------------------------------------------------

    def put(
        self,
        embeddings: torch.Tensor,  # [num_tokens, hidden] bf16/fp16/fp32, any device
        consumers: int = 1,
        consumer_host: HostIdentity | None = None,
    ) -> EmbeddingLocation:
        """Store one item; never fails for lack of pool space (falls back to grpc_stream)."""
        dtype = dtype_name(embeddings.dtype)
        # Sweeping here bounds memory even if the service never runs its periodic sweep.
        self.sweep_expired()
        shape = tuple(embeddings.shape)
        nbytes = embeddings.numel() * embeddings.element_size()
        generation = next(self._generations)
        ttl = self.config.ttl_s
        local_consumer = consumer_host is None or consumer_host == self.host
        if self._pool is not None and self._slots is not None and local_consumer:
            with self._lock:
                slot = self._slots.allocate(nbytes, consumers, ttl, generation)
            if slot is not None:
                offset = slot.slot_id * self.config.block_bytes
                self._pool.write(offset, embeddings)
                self.stats.puts[self._pool.kind] += 1
                key = EmbeddingKey(self.pool_id, slot.slot_id, generation)
                return self._location(self._pool.kind, key, offset, nbytes, dtype, shape)
            self.stats.pool_fallbacks += 1
        data = as_bytes(embeddings.detach()).cpu().numpy().tobytes()
        lease = Lease(generation, max(1, consumers), self._clock() + ttl)
        with self._lock:
            self._spilled[generation] = _Spilled(data, lease)
        self.stats.puts["grpc_stream"] += 1
        key = EmbeddingKey(self.pool_id, SPILL_SLOT, generation)
        return self._location("grpc_stream", key, 0, nbytes, dtype, shape)

    def _location(self, path, key, offset, nbytes, dtype, shape) -> EmbeddingLocation:
        return EmbeddingLocation(
            path=path,
            key=key,
            host=self.host,
            offset=offset,
            nbytes=nbytes,
            dtype=dtype,
            shape=shape,
            ttl_s=self.config.ttl_s,
        )

    # -- free ----------------------------------------------------------------------------

    def ack(
        self, item: str | EmbeddingKey | EmbeddingLocation, consumer: str | None = None
    ) -> AckOutcome:
        """One consumer is done with ``item``; naming the consumer makes repeated acks no-ops.

        Unknown, stale or foreign ids are answered with ``known=False`` (acks are idempotent).
        """
        key = _key_of(item)
        if key.pool_id != self.pool_id:
            return AckOutcome(known=False, released=False)
        with self._lock:
            if key.slot_id == SPILL_SLOT:
                spilled = self._spilled.get(key.generation)
                if spilled is None:
                    outcome = AckOutcome(known=False, released=False)
                elif spilled.lease.ack(consumer):
                    del self._spilled[key.generation]
                    outcome = AckOutcome(known=True, released=True)
                else:
                    outcome = AckOutcome(known=True, released=False)
            elif self._slots is not None:
                outcome = self._slots.ack(key.slot_id, key.generation, consumer)
            else:
                outcome = AckOutcome(known=False, released=False)
        self.stats.acks += int(outcome.known)
        self.stats.released += int(outcome.released)
        return outcome

    def release(self, item: str | EmbeddingKey | EmbeddingLocation) -> bool:
        """Free ``item`` now, whatever its acks (undoes a put whose request failed later)."""
        key = _key_of(item)
        if key.pool_id != self.pool_id:
            return False
        with self._lock:
            if key.slot_id == SPILL_SLOT:
                return self._spilled.pop(key.generation, None) is not None
            return self._slots.release(key.slot_id, key.generation) if self._slots else False

    def sweep_expired(self) -> int:
        """Free every item whose TTL ran out; returns how many. Call it periodically."""
        now = self._clock()
        with self._lock:
            freed = self._slots.sweep_expired(now) if self._slots is not None else 0
            stale = [g for g, s in self._spilled.items() if s.lease.expires_at <= now]
            for g in stale:
                del self._spilled[g]
            self._spill_expired += len(stale)
            self._sync_expired()
        return freed + len(stale)

    def _sync_expired(self) -> None:
        pooled = self._slots.expired_total if self._slots is not None else 0
        self.stats.expired = pooled + self._spill_expired

    # -- serve ---------------------------------------------------------------------------

    def stream_chunks(
        self,
        item: str | EmbeddingKey | EmbeddingLocation,
        chunk_bytes: int | None = None,
        frame: Callable[[EmbeddingChunk], Framed] = copy_chunk,  # type: ignore[assignment]
    ) -> Iterator[Framed]:
        """The item's bytes as bounded chunks, for ``FetchEmbedding``, each passed through
        ``frame`` (by default a chunk owning a copy of its bytes).

        ``frame`` gets a chunk whose ``data`` views the item's memory and must copy what it
        keeps: the view is valid only during the call. Raises StaleSlotError (before the first
        chunk or between chunks) when the item is unknown, already freed, or freed while being
        read.
        """
        key = _key_of(item)
        chunk_bytes = chunk_bytes or self.config.chunk_bytes
        checksum = self.config.stream_checksum
        if key.pool_id != self.pool_id:
            raise StaleSlotError(f"embedding {key} belongs to another encoder")
        if key.slot_id == SPILL_SLOT:
            with self._lock:
                spilled = self._spilled.get(key.generation)
            if spilled is None:
                raise StaleSlotError(f"embedding {key} was released or expired")
            self.stats.fetches["grpc_stream"] += 1
            self.stats.fetch_bytes["grpc_stream"] += len(spilled.data)
            # Immutable bytes held by this reference: a release mid-stream cannot change them.
            for chunk in chunk_views(spilled.data, chunk_bytes, checksum):
                yield frame(chunk)
            return
        with self._lock:
            slot = self._slots.lookup(key.slot_id, key.generation) if self._slots else None
        if slot is None or self._pool is None:
            raise StaleSlotError(f"embedding {key} was released or expired")
        generations = self._pool.control.generations
        view = self._pool.read(slot.slot_id * self.config.block_bytes, slot.nbytes)
        self.stats.fetches["grpc_stream"] += 1
        self.stats.fetch_bytes["grpc_stream"] += slot.nbytes
        for chunk in chunk_views(view, chunk_bytes, checksum):
            framed = frame(chunk)
            # NOTE: checked after ``frame`` copied the chunk out of the pool: a slot freed (TTL)
            # and reused mid-stream must not leak another item's bytes into this one.
            if int(generations[slot.slot_id]) != key.generation:
                raise StaleSlotError(f"embedding {key} expired while it was being streamed")
            yield framed

    # -- shutdown ------------------------------------------------------------------------

    def close(self) -> None:
        """Free everything and unlink the pool; importers see it as closed from now on."""
        with self._lock:
            if self._slots is not None:
                self._slots.release_all()
            self._spilled.clear()
            pool, self._pool, self._slots = self._pool, None, None
        if pool is not None:
            pool.close()

    def __enter__(self) -> EmbeddingExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _key_of(item: str | EmbeddingKey | EmbeddingLocation) -> EmbeddingKey:
    if isinstance(item, EmbeddingLocation):
        return item.key
    if isinstance(item, EmbeddingKey):
        return item
    return EmbeddingKey.parse(item)
