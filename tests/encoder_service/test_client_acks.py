"""EncoderClient's queued acks and its in-place stream reader, against a scripted encoder.

A reader must get its tensor without waiting for the encoder's answer to the Ack, yet no ack may
be dropped: queued acks leave (one call per loop turn), ``close`` waits for them, and a failed one
is counted instead of failing the read. A stream message that is not a chunk fails the fetch as
a cut stream (DATA_LOSS).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
import torch

from encoder_service import convert
from encoder_service.client import EncoderClient
from encoder_service.items import EncodedItem, Modality
from encoder_service.transport import (
    EmbeddingExporter,
    ExporterConfig,
    StreamCutError,
    grpc_status,
)
from protos import encoder_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Encoder"].full_name


class ScriptedEncoder:
    """FetchEmbedding from a pool-less exporter (so every item streams) and an Ack that can be
    held back (``ack_gate``), fail (``ack_code``) or answer at once; records every Ack call."""

    def __init__(self) -> None:
        self.exporter = EmbeddingExporter(ExporterConfig(pool_bytes=0, chunk_bytes=4096))
        self.ack_calls: list[list[str]] = []
        self.ack_gate: asyncio.Event | None = None
        self.ack_code: grpc.StatusCode | None = None
        self.garbage = False  # FetchEmbedding sends bytes that are not a chunk

    async def fetch(self, request: bytes, context):
        req = pb.FetchEmbeddingRequest.FromString(request)
        if self.garbage:
            yield b"\x0a\xff"  # a bytes field longer than the message
            return
        for chunk in self.exporter.stream_chunks(req.embedding_id, req.chunk_bytes):
            yield convert.chunk_message(chunk).SerializeToString()

    async def ack(self, request: pb.AckRequest, context) -> pb.AckResponse:
        self.ack_calls.append(list(request.embedding_ids))
        if self.ack_gate is not None:
            await self.ack_gate.wait()
        if self.ack_code is not None:
            await context.abort(self.ack_code, "scripted failure")
        known, released = 0, 0
        for embedding_id in request.embedding_ids:
            outcome = self.exporter.ack(embedding_id, request.consumer or None)
            known, released = known + outcome.known, released + outcome.released
        return convert.ack_response(known, released)

    async def start(self) -> str:
        handlers = {
            "FetchEmbedding": grpc.unary_stream_rpc_method_handler(self.fetch),
            "Ack": grpc.unary_unary_rpc_method_handler(
                self.ack,
                request_deserializer=pb.AckRequest.FromString,
                response_serializer=pb.AckResponse.SerializeToString,
            ),
        }
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),)
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"

    async def stop(self) -> None:
        await self.server.stop(None)
        self.exporter.close()


def _embedding(seed: int) -> torch.Tensor:  # [40, 64] bf16: 5120 bytes, two chunks
    return torch.randn(40, 64, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


async def _with_encoder(body):
    encoder = ScriptedEncoder()
    target = await encoder.start()
    try:
        return await body(encoder, target)
    finally:
        await encoder.stop()


def _descriptor(encoder: ScriptedEncoder, seed: int):
    """What the decoder holds after Encode: the reply's descriptor (no location, so it streams)."""
    tensor = _embedding(seed)
    loc = encoder.exporter.put(tensor)
    item = EncodedItem("h", Modality.IMAGE, tensor, (1, 2 * tensor.shape[0], 2), (), False)
    return convert.descriptors_from_response(convert.encode_response([item], [loc]))[0]


def test_fetch_with_ack_returns_before_the_encoder_answers_the_ack():
    async def body(encoder: ScriptedEncoder, target: str):
        encoder.ack_gate = asyncio.Event()
        async with EncoderClient(target) as client:
            desc = _descriptor(encoder, 1)
            tensor = await asyncio.wait_for(client.fetch(desc, ack=True), timeout=10)
            await asyncio.sleep(0.05)  # the ack reached the encoder, which holds its answer
            held = (list(encoder.ack_calls), client.acks_pending)
            encoder.ack_gate.set()
            await client.drain_acks()
            return desc, tensor, held, client.acks_pending, encoder.exporter.spilled_bytes

    desc, tensor, held, pending_after, spilled = asyncio.run(_with_encoder(body))
    assert torch.equal(tensor, _embedding(1))
    assert held == ([[desc.embedding_id]], 1)  # sent, not answered, and the read was done
    assert pending_after == 0 and spilled == 0  # answered: the encoder freed it


def test_acks_queued_in_one_loop_turn_leave_as_one_call_and_close_waits_for_them():
    async def body(encoder: ScriptedEncoder, target: str):
        descs = [_descriptor(encoder, seed) for seed in range(3)]
        client = EncoderClient(target)
        tensors = await asyncio.gather(*(client.fetch(d) for d in descs))
        for d in descs:
            client.ack_later([d.embedding_id])
        await client.close()  # must not cancel what is queued
        return descs, tensors, encoder.ack_calls, encoder.exporter.spilled_bytes

    descs, tensors, calls, spilled = asyncio.run(_with_encoder(body))
    assert all(torch.equal(t, _embedding(s)) for s, t in enumerate(tensors))
    assert calls == [[d.embedding_id for d in descs]]
    assert spilled == 0


def test_a_failed_ack_is_counted_and_logged_not_raised(caplog):
    async def body(encoder: ScriptedEncoder, target: str):
        encoder.ack_code = grpc.StatusCode.UNAVAILABLE
        async with EncoderClient(target) as client:
            tensor = await client.fetch(_descriptor(encoder, 4), ack=True)
            await client.drain_acks()
            return tensor, client.acks_failed, client.acks_pending

    with caplog.at_level(logging.WARNING, logger="encoder_service.client"):
        tensor, failed, pending = asyncio.run(_with_encoder(body))
    assert torch.equal(tensor, _embedding(4))
    assert (failed, pending) == (1, 0)
    assert "UNAVAILABLE" in caplog.text and "TTL" in caplog.text


def test_a_stream_message_that_is_not_a_chunk_is_a_cut_stream():
    async def body(encoder: ScriptedEncoder, target: str):
        encoder.garbage = True
        async with EncoderClient(target) as client:
            with pytest.raises(StreamCutError) as info:
                await client.fetch(_descriptor(encoder, 5))
            return info.value, client.importer.stats.errors

    err, errors = asyncio.run(_with_encoder(body))
    assert grpc_status(err) == grpc.StatusCode.DATA_LOSS
    assert "could not be parsed" in str(err)
    assert errors["StreamCutError"] == 1


def test_an_ack_queued_while_another_is_in_flight_gets_its_own_call():
    async def body(encoder: ScriptedEncoder, target: str):
        encoder.ack_gate = asyncio.Event()
        first, second = _descriptor(encoder, 6), _descriptor(encoder, 7)
        async with EncoderClient(target) as client:
            client.ack_later([first.embedding_id])
            while not encoder.ack_calls:  # the first call is at the encoder, unanswered
                await asyncio.sleep(0.01)
            client.ack_later([second.embedding_id])
            await asyncio.sleep(0.05)
            encoder.ack_gate.set()
            await client.drain_acks()
            return first, second, encoder.ack_calls, encoder.exporter.spilled_bytes

    first, second, calls, spilled = asyncio.run(_with_encoder(body))
    assert calls == [[first.embedding_id], [second.embedding_id]]
    assert spilled == 0
