"""Async client of an encoder replica: Encode, FetchEmbedding (grpc_stream) and Ack.

Contract: ``EncoderClient(target)`` opens one channel with explicit message size limits and
keepalive settings that match the server's. ``encode`` returns ``EmbeddingDescriptor``s;
``fetch`` reassembles a streamed embedding into a tensor of the descriptor's dtype and shape and
raises ``IncompleteEmbeddingError`` (never returns partial data) when the stream has a gap, an
overlap, a size mismatch or ends early; ``ack`` releases embeddings. gRPC errors from the server
propagate as ``grpc.aio.AioRpcError`` with the server's status code.
Pool transports (shm / CUDA IPC) do not belong here.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import torch

from encoder_service import convert
from encoder_service.config import MIB
from encoder_service.items import EmbeddingDescriptor, MediaItem
from protos import encoder_pb2_grpc as pb_grpc

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class IncompleteEmbeddingError(Exception):
    """A FetchEmbedding stream did not deliver exactly the descriptor's bytes."""


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


class EncoderClient:
    def __init__(self, target: str, max_message_bytes: int = 128 * MIB) -> None:
        self.target = target
        self._channel = grpc.aio.insecure_channel(
            target, options=channel_options(max_message_bytes)
        )
        self._stub = pb_grpc.EncoderStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> EncoderClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def encode(
        self,
        items: Sequence[MediaItem],
        num_consumers: int = 1,
        timeout: float | None = None,
    ) -> list[EmbeddingDescriptor]:
        reply = await self._stub.Encode(
            convert.encode_request(items, num_consumers), timeout=timeout
        )
        return convert.descriptors_from_response(reply)

    async def fetch(
        self, desc: EmbeddingDescriptor, chunk_bytes: int = 0, timeout: float | None = None
    ) -> torch.Tensor:  # [num_tokens, hidden] desc.dtype, cpu
        if desc.dtype not in _DTYPES:
            raise IncompleteEmbeddingError(f"unknown embedding dtype {desc.dtype!r}")
        buf = bytearray(desc.nbytes)
        filled = 0
        call = self._stub.FetchEmbedding(
            convert.fetch_request(desc.embedding_id, chunk_bytes), timeout=timeout
        )
        async for chunk in call:
            end = chunk.offset + len(chunk.data)
            if chunk.total_bytes != desc.nbytes or chunk.offset != filled or end > desc.nbytes:
                call.cancel()
                raise IncompleteEmbeddingError(
                    f"embedding {desc.embedding_id}: chunk [{chunk.offset}, {end}) of "
                    f"{chunk.total_bytes} bytes does not continue at {filled} of {desc.nbytes}"
                )
            buf[chunk.offset : end] = chunk.data
            filled = end
        if filled != desc.nbytes:
            raise IncompleteEmbeddingError(
                f"embedding {desc.embedding_id}: stream ended after {filled} of {desc.nbytes} bytes"
            )
        return torch.frombuffer(buf, dtype=_DTYPES[desc.dtype]).view(desc.shape)

    async def ack(self, embedding_ids: Sequence[str]) -> tuple[int, int]:
        """Returns (ids the encoder knew, embeddings it freed)."""
        reply = await self._stub.Ack(convert.ack_request(embedding_ids))
        return reply.acknowledged, reply.released
