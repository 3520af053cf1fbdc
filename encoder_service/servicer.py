"""gRPC ``glimpse.encoder.v1.Encoder`` servicer: validate -> convert -> submit -> reply.

Contract: every failure leaves as a gRPC status (never as an error inside an OK reply):
``EncodeError`` kinds map to INVALID_ARGUMENT, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, NOT_FOUND
and UNAVAILABLE, with the pipeline's message (which names the failing item). Cancellation and
deadlines come from the context: a cancelled call cancels its pipeline tasks. Encode replies are
bounded by ``--mm-per-request-timeout`` and the caller's own deadline, whichever is shorter.
Pipeline logic does not belong here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc

from encoder_service import convert
from encoder_service.config import EncoderConfig
from encoder_service.errors import EncodeError, ErrorKind
from encoder_service.metrics import EncoderMetrics
from encoder_service.pipeline import EncodePipeline
from encoder_service.store import EmbeddingStore
from protos import encoder_pb2 as pb
from protos import encoder_pb2_grpc as pb_grpc

_STATUS = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}
MIN_CHUNK_BYTES = 1 << 10
MAX_CHUNK_BYTES = 4 << 20
MAX_ACK_IDS = 4096


class EncoderServicer(pb_grpc.EncoderServicer):
    def __init__(
        self,
        config: EncoderConfig,
        store: EmbeddingStore,
        metrics: EncoderMetrics,
        pipeline: Callable[[], EncodePipeline | None],
    ) -> None:
        self._config = config
        self._store = store
        self._metrics = metrics
        self._pipeline = pipeline  # None until the weights are loaded and warmed up

    async def _fail(
        self, context: grpc.aio.ServicerContext, method: str, err: EncodeError
    ) -> NoReturn:
        self._metrics.rpcs.labels(method=method, code=_STATUS[err.kind].name).inc()
        await context.abort(_STATUS[err.kind], err.message)

    def _ok(self, method: str) -> None:
        self._metrics.rpcs.labels(method=method, code="OK").inc()

    async def Encode(
        self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.EncodeResponse:
        try:
            pipeline = self._pipeline()
            if pipeline is None:
                raise EncodeError(ErrorKind.UNAVAILABLE, "encoder is loading; retry shortly")
            items = convert.items_from_request(request, self._config.batch.max_items_per_request)
            budget = self._config.batch.mm_per_request_timeout_s
            remaining = context.time_remaining()
            if remaining is not None:
                budget = min(budget, remaining)
            encoded = await pipeline.encode(items, budget)
            stored = self._store.put_all([e.embedding for e in encoded], request.num_consumers)
        except EncodeError as err:
            await self._fail(context, "Encode", err)  # raises: abort ends the call
        self._ok("Encode")
        return convert.encode_response(encoded, stored)

    async def FetchEmbedding(
        self, request: pb.FetchEmbeddingRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EmbeddingChunk]:
        try:
            data = self._store.read(request.embedding_id)
        except EncodeError as err:
            await self._fail(context, "FetchEmbedding", err)
            return
        chunk = request.chunk_bytes or self._config.server.stream_chunk_bytes
        chunk = max(MIN_CHUNK_BYTES, min(MAX_CHUNK_BYTES, chunk))
        total = data.nbytes
        # NOTE: ``data`` keeps the tensor alive even if the entry is acked or expires mid-stream.
        for offset in range(0, total, chunk):
            yield convert.chunk_message(offset, bytes(data[offset : offset + chunk]), total)
        self._ok("FetchEmbedding")

    async def Ack(
        self, request: pb.AckRequest, context: grpc.aio.ServicerContext
    ) -> pb.AckResponse:
        if len(request.embedding_ids) > MAX_ACK_IDS:
            err = EncodeError(ErrorKind.INVALID, f"Ack names more than {MAX_ACK_IDS} ids")
            await self._fail(context, "Ack", err)
        known, released = self._store.ack(list(request.embedding_ids))
        self._ok("Ack")
        return convert.ack_response(known, released)
