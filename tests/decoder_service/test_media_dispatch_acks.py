"""MediaDispatcher's acks: off the request's path, batched, and never the reason a request fails.

A scripted encoder (FetchEmbedding from a pool-less exporter, an Ack that records its calls and
can be told to fail) stands behind a real ``Replica``.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import torch

from decoder_service.encoder_pool import Replica
from decoder_service.media_dispatch import MediaDispatcher, Pending, PreparedPrompt
from encoder_service import convert
from encoder_service.items import EncodedItem, Modality
from encoder_service.transport import EmbeddingExporter, EmbeddingImporter, ExporterConfig
from protos import encoder_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Encoder"].full_name


class _Encoder:
    def __init__(self) -> None:
        self.exporter = EmbeddingExporter(ExporterConfig(pool_bytes=0))
        self.ack_calls: list[list[str]] = []
        self.fail_acks = False

    async def fetch(self, request: pb.FetchEmbeddingRequest, context):
        for chunk in self.exporter.stream_chunks(request.embedding_id, request.chunk_bytes):
            yield convert.chunk_message(chunk)

    async def ack(self, request: pb.AckRequest, context) -> pb.AckResponse:
        self.ack_calls.append(list(request.embedding_ids))
        if self.fail_acks:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted failure")
        for embedding_id in request.embedding_ids:
            self.exporter.ack(embedding_id)
        return convert.ack_response(len(request.embedding_ids), 0)

    async def start(self) -> str:
        handlers = {
            "FetchEmbedding": grpc.unary_stream_rpc_method_handler(
                self.fetch,
                request_deserializer=pb.FetchEmbeddingRequest.FromString,
                response_serializer=pb.EmbeddingChunk.SerializeToString,
            ),
            "Ack": grpc.unary_unary_rpc_method_handler(
                self.ack,
                request_deserializer=pb.AckRequest.FromString,
                response_serializer=pb.AckResponse.SerializeToString,
            ),
        }
        self.server = grpc.aio.server()
        generic = grpc.method_handlers_generic_handler(SERVICE, handlers)
        self.server.add_generic_rpc_handlers((generic,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"

    def pending(self, index: int, replica: Replica) -> Pending:
        tensor = torch.full((8, 16), float(index), dtype=torch.bfloat16)  # [8, 16] bf16
        loc = self.exporter.put(tensor)
        item = EncodedItem(f"h{index}", Modality.IMAGE, tensor, (1, 4, 8), (), False)
        reply = convert.encode_response([item], [loc])
        return Pending(index, replica, convert.descriptors_from_response(reply)[0])


async def _run(body):
    encoder = _Encoder()
    target = await encoder.start()
    importer = EmbeddingImporter()
    replica = Replica(target, 8 << 20, importer)
    dispatcher = MediaDispatcher(None, None, None)  # fetch and release use neither
    try:
        return await body(encoder, replica, dispatcher)
    finally:
        await replica.close()
        importer.close()
        await encoder.server.stop(None)
        encoder.exporter.close()


def test_release_of_a_requests_items_is_one_ack_call_sent_in_the_background():
    async def body(encoder: _Encoder, replica: Replica, dispatcher: MediaDispatcher):
        pending = [encoder.pending(i, replica) for i in range(3)]
        dispatcher.release(pending)  # synchronous: nothing awaited on the caller's path
        queued = replica.client.acks_pending
        await replica.client.drain_acks()
        return pending, queued, encoder.ack_calls, encoder.exporter.spilled_bytes

    pending, queued, calls, spilled = asyncio.run(_run(body))
    assert queued == 3
    assert calls == [[p.descriptor.embedding_id for p in pending]]
    assert spilled == 0  # all three freed


def test_a_failing_ack_does_not_fail_the_fetch():
    async def body(encoder: _Encoder, replica: Replica, dispatcher: MediaDispatcher):
        encoder.fail_acks = True
        pending = [encoder.pending(i, replica) for i in range(2)]
        prepared = PreparedPrompt([1, 2], [], None, 0, pending)
        attached: dict[int, torch.Tensor] = {}
        await dispatcher.fetch(prepared, attached.__setitem__, time.monotonic() + 30)
        await replica.client.drain_acks()
        return attached, encoder.ack_calls, replica.client.acks_failed

    attached, calls, failed = asyncio.run(_run(body))
    assert sorted(attached) == [0, 1]
    assert all(torch.all(attached[i] == i) for i in attached)
    assert sum(len(c) for c in calls) == 2 and failed == 2  # each acked (and refused) once
