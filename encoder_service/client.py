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
errors pass through as ``grpc.aio.AioRpcError``. ``ack`` releases embeddings (``fetch(...,
ack=True)`` does both); the other RPC errors propagate as ``grpc.aio.AioRpcError``.
Transfer mechanics (pools, chunk checks) live in ``encoder_service.transport``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
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
    TransportError,
    grpc_message_options,
)
from protos import encoder_pb2_grpc as pb_grpc

# Older name of the fetch failure; every transport failure is one.
IncompleteEmbeddingError = TransportError


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


class _ChunkStream:
    """A FetchEmbedding call seen as transport chunks; ``cancel`` stops the call."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __aiter__(self) -> AsyncIterator[EmbeddingChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[EmbeddingChunk]:
        async for msg in self._call:
            yield convert.chunk_from_message(msg)

    def cancel(self) -> None:
        self._call.cancel()


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
        self._owns_importer = importer is None
        self.importer = importer if importer is not None else EmbeddingImporter(ImporterConfig())

    async def close(self) -> None:
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
            return _ChunkStream(self._stub.FetchEmbedding(request, timeout=timeout))

        tensor = await self.importer.fetch(location, stream)
        if ack:
            await self.ack([desc.embedding_id], consumer=consumer, timeout=timeout)
        return tensor

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
