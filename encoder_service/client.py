"""Async client of an encoder replica: Encode, fetch (pool or stream) and Ack.

Contract: ``EncoderClient(target, importer=...)`` opens one channel with explicit message size
limits (never below what a stream chunk needs) and keepalive settings that match the server's.
``encode`` returns ``LocatedDescriptor``s (``EmbeddingDescriptor``s that also carry the
transport's ``EmbeddingLocation``) and tells the encoder this host's identity, so a remote reader
gets ``grpc_stream`` items and never holds pool space. ``fetch`` reads one embedding through the
transport's ``EmbeddingImporter``: from the encoder's pool (``shm`` / ``cuda_ipc``, opened once per
encoder and cached) when the encoder is on this host, else, or when the pool cannot be opened, from
the ``FetchEmbedding`` stream. It returns a tensor of the descriptor's dtype and shape on the
importer's output device (CPU by default) or raises a ``TransportError`` (``status_name``
UNAVAILABLE when the encoder or its pool is gone, DATA_LOSS for a stale, freed or out-of-pool slot
and a cut or corrupt stream); it never returns partial or foreign bytes. Deadline and cancellation
errors pass through as ``grpc.aio.AioRpcError``. ``ack`` releases embeddings and waits for the
reply (its RPC errors propagate as ``grpc.aio.AioRpcError``); ``ack_later`` and ``fetch(...,
ack=True)`` (after a successful read) queue the ack instead and return at once: the reader has
its tensor and does not wait a round trip for the encoder's answer. Queued acks of one event-loop
turn leave as one Ack call per consumer; they are held until they finish (``drain_acks`` waits
for them, ``close`` drains before closing the channel), and a failed one is logged and counted in
``acks_failed`` (the encoder frees those embeddings when their TTL runs out).
Stream replies are read from their wire bytes in place (``convert.chunk_from_wire``): the
payload is copied once, into the destination tensor.
Transfer mechanics (pools, chunk checks) live in ``encoder_service.transport``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import torch

from encoder_service import convert
from encoder_service.config import MIB
from encoder_service.items import EmbeddingDescriptor, MediaItem
from encoder_service.transport import (
    EmbeddingChunk,
    EmbeddingImporter,
    EmbeddingLocation,
    ImporterConfig,
    StreamCutError,
    TransportError,
    grpc_message_options,
)
from protos import encoder_pb2 as pb
from protos import encoder_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Older name of the fetch failure; every transport failure is one.
IncompleteEmbeddingError = TransportError

ACK_TIMEOUT_S = 10.0  # a queued ack is not bound by its request's deadline
_MAX_IDS_PER_ACK = 1024  # below the encoder's per-call limit (4096)


@dataclasses.dataclass(frozen=True)
class LocatedDescriptor(EmbeddingDescriptor):
    """An Encode reply item together with where its bytes lie (pool slot or stream)."""

    location: EmbeddingLocation | None = None


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    # Raw media travel inside Encode, so the limits are the larger of that and a stream chunk.
    sizes = [
        (key, max(max_message_bytes, value) if key.endswith("_message_length") else value)
        for key, value in grpc_message_options()
    ]
    return [*sizes, ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)]


def _read_chunk(raw: bytes) -> EmbeddingChunk | None:
    """FetchEmbedding's reply deserializer; None marks a malformed message (see _ChunkStream)."""
    try:
        return convert.chunk_from_wire(raw)
    except ValueError:
        return None


class _ChunkStream:
    """A FetchEmbedding call seen as transport chunks; ``cancel`` stops the call."""

    def __init__(self, call: Any, what: str) -> None:
        self._call = call
        self._what = what

    def __aiter__(self) -> AsyncIterator[EmbeddingChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[EmbeddingChunk]:
        async for chunk in self._call:
            if chunk is None:
                raise StreamCutError(f"{self._what}: a stream message could not be parsed")
            yield chunk

    def cancel(self) -> None:
        self._call.cancel()


AckFn = Callable[[list[str], "str | None"], Awaitable[Any]]


class _AckQueue:
    """Acks sent without the caller waiting: coalesced per loop turn, held until they finish.

    NOTE: asyncio keeps only weak references to tasks; ``_tasks`` holds each send until it ends,
    so an ack can be lost only by its RPC failing (then the encoder's TTL frees the embedding).
    """

    def __init__(self, send: AckFn, target: str) -> None:
        self._send = send
        self._target = target
        self._queued: dict[str | None, list[str]] = {}  # consumer -> ids not sent yet
        self._tasks: set[asyncio.Task[None]] = set()
        self._flush: asyncio.Task[None] | None = None
        self._in_flight = 0  # ids in Ack calls not answered yet
        self.failed = 0  # ids whose Ack call failed

    @property
    def pending(self) -> int:
        """Ids queued or in flight."""
        return sum(len(ids) for ids in self._queued.values()) + self._in_flight

    def put(self, ids: Sequence[str], consumer: str | None) -> None:
        if not ids:
            return
        self._queued.setdefault(consumer, []).extend(ids)
        if self._flush is None or self._flush.done():
            self._flush = asyncio.get_running_loop().create_task(self._send_queued())
            self._tasks.add(self._flush)
            self._flush.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _send_queued(self) -> None:
        await asyncio.sleep(0)  # acks queued during this loop turn join the same call
        queued, self._queued, self._flush = self._queued, {}, None  # later ones: a new call
        calls = [
            (ids[i : i + _MAX_IDS_PER_ACK], consumer)
            for consumer, ids in queued.items()
            for i in range(0, len(ids), _MAX_IDS_PER_ACK)
        ]
        self._in_flight += sum(len(ids) for ids, _ in calls)
        await asyncio.gather(*(self._send_one(ids, consumer) for ids, consumer in calls))

    async def _send_one(self, ids: list[str], consumer: str | None) -> None:
        try:
            await self._send(ids, consumer)
        except grpc.aio.AioRpcError as err:
            self.failed += len(ids)
            log.warning(
                "ack of %d embeddings to %s failed (%s); the encoder frees them after their TTL",
                len(ids),
                self._target,
                err.code().name,
            )
        finally:
            self._in_flight -= len(ids)


def _location(desc: EmbeddingDescriptor) -> EmbeddingLocation:
    located = getattr(desc, "location", None)
    if located is not None:
        return located
    # A descriptor built without its location can still be streamed by id.
    return EmbeddingLocation.from_dict(
        {
            "embedding_id": desc.embedding_id,
            "transport": "grpc_stream",
            "host_id": "unknown/unknown",
            "offset": 0,
            "nbytes": desc.nbytes,
            "dtype": desc.dtype,
            "shape": list(desc.shape),
            "ttl_s": desc.ttl_s,
        }
    )


class EncoderClient:
    def __init__(
        self,
        target: str,
        max_message_bytes: int = 128 * MIB,
        importer: EmbeddingImporter | None = None,
    ) -> None:
        """``importer`` may be shared by several clients (it caches every encoder's pool);
        without one the client owns a CPU importer that picks the path by host identity."""
        self.target = target
        self._channel = grpc.aio.insecure_channel(
            target, options=channel_options(max_message_bytes)
        )
        self._stub = pb_grpc.EncoderStub(self._channel)
        # The stub's own FetchEmbedding parses each reply into a message and copies the payload
        # out of it; this one reads the wire bytes in place.
        self._fetch_stream = self._channel.unary_stream(
            convert.FETCH_EMBEDDING_PATH,
            request_serializer=pb.FetchEmbeddingRequest.SerializeToString,
            response_deserializer=_read_chunk,
        )
        self._acks = _AckQueue(self._ack_call, target)
        self._owns_importer = importer is None
        self.importer = importer if importer is not None else EmbeddingImporter(ImporterConfig())

    @property
    def acks_failed(self) -> int:
        """Embedding ids whose queued Ack call failed (the encoder frees them on its TTL)."""
        return self._acks.failed

    @property
    def acks_pending(self) -> int:
        """Embedding ids queued by ``ack_later`` or ``fetch(ack=True)`` whose call has not ended."""
        return self._acks.pending

    async def close(self) -> None:
        await self._acks.drain()  # closing the channel first would cancel the acks in flight
        await self._channel.close()
        if self._owns_importer:
            self.importer.close()

    async def __aenter__(self) -> EncoderClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _reader_host_id(self) -> str:
        # A forced pool path means "same host whatever the identities say" (containers sharing
        # IPC but not a hostname): the encoder must then offer its pool to this reader.
        if self.importer.config.force_path in ("shm", "cuda_ipc"):
            return ""
        return self.importer.host.key

    async def encode(
        self,
        items: Sequence[MediaItem],
        num_consumers: int = 1,
        timeout: float | None = None,
    ) -> list[LocatedDescriptor]:
        request = convert.encode_request(items, num_consumers, self._reader_host_id())
        reply = await self._stub.Encode(request, timeout=timeout)
        descs = convert.descriptors_from_response(reply)
        out = []
        for desc, msg in zip(descs, reply.items, strict=True):
            fields = {f.name: getattr(desc, f.name) for f in dataclasses.fields(desc)}
            out.append(LocatedDescriptor(**fields, location=convert.location_from_message(msg)))
        return out

    async def fetch(
        self,
        desc: EmbeddingDescriptor,
        chunk_bytes: int = 0,
        timeout: float | None = None,
        *,
        ack: bool = False,
        consumer: str | None = None,
    ) -> torch.Tensor:  # [num_tokens, hidden] desc.dtype, on importer.output_device
        """The embedding ``desc`` names; with ``ack=True`` also acknowledges it (as ``consumer``)."""
        location = _location(desc)

        def stream(loc: EmbeddingLocation) -> _ChunkStream:
            request = convert.fetch_request(loc.embedding_id, chunk_bytes)
            call = self._fetch_stream(request, timeout=timeout)
            return _ChunkStream(call, f"embedding {loc.embedding_id}")

        tensor = await self.importer.fetch(location, stream)
        if ack:
            # NOTE: queued, not awaited: the tensor is already ours and the encoder's reply
            # changes nothing for this reader. A failed read is not acked here: the caller
            # still owns that embedding and releases it (ack_later) when it gives up.
            self.ack_later([desc.embedding_id], consumer=consumer)
        return tensor

    def ack_later(self, embedding_ids: Sequence[str], consumer: str | None = None) -> None:
        """Queue an ack and return at once (needs a running event loop); see ``drain_acks``."""
        self._acks.put(list(embedding_ids), consumer)

    async def drain_acks(self) -> None:
        """Wait until every queued ack has been answered or has failed."""
        await self._acks.drain()

    async def _ack_call(self, embedding_ids: list[str], consumer: str | None) -> None:
        await self.ack(embedding_ids, consumer=consumer, timeout=ACK_TIMEOUT_S)

    async def ack(
        self,
        embedding_ids: Sequence[str],
        consumer: str | None = None,
        timeout: float | None = None,
    ) -> tuple[int, int]:
        """Returns (ids the encoder knew, embeddings it freed). Acks naming the same
        ``consumer`` count once per id, so retrying a failed Ack is safe."""
        request = convert.ack_request(embedding_ids, consumer or "")
        reply = await self._stub.Ack(request, timeout=timeout)
        return reply.acknowledged, reply.released
