"""gRPC ``glimpse.encoder.v1.Encoder`` servicer: validate -> convert -> submit -> reply.

Contract: every failure leaves as a gRPC status (never as an error inside an OK reply):
``EncodeError`` kinds map to INVALID_ARGUMENT, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, NOT_FOUND
and UNAVAILABLE, with the pipeline's message (which names the failing item); a transport error in
the middle of a FetchEmbedding stream (the item expired while streamed) leaves with its own code
(DATA_LOSS). Cancellation and deadlines come from the context: a cancelled call cancels its
pipeline tasks. Encode replies are bounded by ``--mm-per-request-timeout`` and the caller's own
deadline, whichever is shorter. Encode stores embeddings in the ``EmbeddingStore`` (pool slots or
streamed copies) and replies with where each one lies; FetchEmbedding streams any live item in
bounded chunks; Ack frees items. Pipeline and transport logic do not belong here.

Serving: ``add_encoder_servicer`` registers the generated handlers with one change: FetchEmbedding
yields each reply as wire bytes written by ``convert.chunk_to_wire`` (the payload's one copy, out
of the pool) and its response serializer passes them through, so a multi-MiB chunk is not built
into a message and serialized again. Clients see an ordinary ``EmbeddingChunk`` stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc

from encoder_service import convert
from encoder_service.config import EncoderConfig
from encoder_service.errors import EncodeError, ErrorKind
from encoder_service.metrics import EncoderMetrics
from encoder_service.pipeline import EncodePipeline
from encoder_service.store import EmbeddingStore
from encoder_service.transport import TransportError, grpc_status
from protos import encoder_pb2 as pb
from protos import encoder_pb2_grpc as pb_grpc

_STATUS = {
    ErrorKind.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}
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
            reader_host = convert.consumer_host(request)
            budget = self._config.batch.mm_per_request_timeout_s
            remaining = context.time_remaining()
            if remaining is not None:
                budget = min(budget, remaining)
            encoded = await pipeline.encode(items, budget)
            embeddings = [e.embedding for e in encoded]
            stored = self._store.put_all(embeddings, request.num_consumers, reader_host)
        except EncodeError as err:
            await self._fail(context, "Encode", err)  # raises: abort ends the call
        self._ok("Encode")
        return convert.encode_response(encoded, stored)

    async def FetchEmbedding(
        self, request: pb.FetchEmbeddingRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:  # serialized EmbeddingChunk messages, see add_encoder_servicer
        # Chunk sizes are clamped by the transport (1 KiB to 4 MiB); 0 takes the server default.
        chunks = self._store.stream(
            request.embedding_id, request.chunk_bytes, convert.chunk_to_wire
        )
        try:
            for wire in chunks:
                yield wire
        except EncodeError as err:  # not live: raised before the first chunk
            await self._fail(context, "FetchEmbedding", err)
        except TransportError as err:  # freed while being streamed: never send other bytes
            code, details = grpc_status(err), str(err)
        else:
            self._ok("FetchEmbedding")
            return
        # NOTE: aborted after the handler: the error's traceback holds the exporter's frame, and
        # with it a view of the pool; raising the abort inside would chain the two into a cycle
        # that keeps the pool mapped until the garbage collector runs.
        self._metrics.rpcs.labels(method="FetchEmbedding", code=code.name).inc()
        await context.abort(code, details)

    async def Ack(
        self, request: pb.AckRequest, context: grpc.aio.ServicerContext
    ) -> pb.AckResponse:
        if len(request.embedding_ids) > MAX_ACK_IDS:
            err = EncodeError(ErrorKind.INVALID, f"Ack names more than {MAX_ACK_IDS} ids")
            await self._fail(context, "Ack", err)
        known, released = self._store.ack(list(request.embedding_ids), request.consumer or None)
        self._ok("Ack")
        return convert.ack_response(known, released)


class _Registrations:
    """Stands in for a server while the generated code registers its method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # rebuilt from the registered handlers below

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers[service] = dict(handlers)


def add_encoder_servicer(servicer: pb_grpc.EncoderServicer, server: grpc.aio.Server) -> None:
    """``pb_grpc.add_EncoderServicer_to_server`` with FetchEmbedding's replies passed through as
    the wire bytes the servicer wrote (``convert.serialize_chunk_reply``)."""
    captured = _Registrations()
    pb_grpc.add_EncoderServicer_to_server(servicer, captured)
    handlers = captured.handlers[convert.ENCODER_SERVICE]
    fetch = handlers["FetchEmbedding"]
    handlers["FetchEmbedding"] = fetch._replace(response_serializer=convert.serialize_chunk_reply)
    generic = grpc.method_handlers_generic_handler(convert.ENCODER_SERVICE, handlers)
    server.add_generic_rpc_handlers((generic,))
    server.add_registered_method_handlers(convert.ENCODER_SERVICE, handlers)
