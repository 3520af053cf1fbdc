"""FetchEmbedding in the servicer: statuses for gone items, a slot reused mid-stream, and the
stream as any protobuf client sees it.

The servicer is driven directly with a stand-in context whose ``abort`` records the status, and a
store on a fake clock, so expiry happens exactly between two chunks. The served tests register it
on a loopback ``grpc.aio`` server as the encoder server does (``add_encoder_servicer``: replies
leave as hand-written wire bytes) and read it with the generated stub.
"""

from __future__ import annotations

import asyncio

import google_crc32c
import grpc
import pytest
import torch

from encoder_service import convert
from encoder_service.config import EncoderConfig, ServerLimits
from encoder_service.metrics import EncoderMetrics
from encoder_service.server import message_options
from encoder_service.servicer import EncoderServicer, add_encoder_servicer
from encoder_service.store import EmbeddingStore
from encoder_service.transport import ExporterConfig, HostIdentity, split_chunks
from protos import encoder_pb2 as pb
from protos import encoder_pb2_grpc as pb_grpc

BLOCK = 4096


class Aborted(Exception):
    pass


class Context:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise Aborted


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup():
    clock = Clock()
    store = EmbeddingStore(
        ExporterConfig(pool_bytes=BLOCK, block_bytes=BLOCK, ttl_s=10), 1 << 20, clock=clock
    )
    servicer = EncoderServicer(EncoderConfig(), store, EncoderMetrics(), lambda: None)
    yield clock, store, servicer
    store.close()


async def collect(servicer, embedding_id: str, ctx: Context, between=None) -> list:
    request = pb.FetchEmbeddingRequest(embedding_id=embedding_id, chunk_bytes=1024)
    chunks = []
    try:
        async for chunk in servicer.FetchEmbedding(request, ctx):
            chunks.append(pb.EmbeddingChunk.FromString(chunk))  # replies leave as wire bytes
            if between is not None and len(chunks) == 1:
                between()
    except Aborted:
        pass
    return chunks


def test_slot_reused_while_streaming_is_data_loss_without_foreign_bytes(setup):
    clock, store, servicer = setup
    mine = torch.zeros(16, 64)  # 4 KiB: four 1 KiB chunks, the whole one-block pool
    [loc] = store.put_all([mine])

    def expire_and_reuse():
        clock.now += 11
        store.sweep()
        [other] = store.put_all([torch.full((16, 64), 7.0)])
        assert other.path == "shm" and other.offset == loc.offset  # same bytes, new item

    ctx = Context()
    chunks = asyncio.run(collect(servicer, loc.embedding_id, ctx, expire_and_reuse))
    assert ctx.code == grpc.StatusCode.DATA_LOSS and "expired" in ctx.details
    assert len(chunks) == 1 and chunks[0].data == bytes(1024)  # only this item's bytes left
    assert chunks[0].HasField("crc32c")


@pytest.mark.parametrize("embedding_id", ["", "not-an-id", "glimpse-1-ab:0:99"])
def test_unknown_or_malformed_ids_are_not_found(setup, embedding_id):
    _, _, servicer = setup
    ctx = Context()
    assert asyncio.run(collect(servicer, embedding_id, ctx)) == []
    assert ctx.code == grpc.StatusCode.NOT_FOUND


# -- served: the stream on the wire ------------------------------------------------------------

ITEM = torch.arange(64 * 256, dtype=torch.float32).reshape(64, 256)  # 64 KiB
OTHER_HOST = HostIdentity(boot_id="b", hostname="elsewhere")  # a reader the pool cannot serve


def item_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.numpy().tobytes()


async def serve(store: EmbeddingStore, body):
    """Run ``body(stub, channel)`` against the servicer on a loopback server."""
    servicer = EncoderServicer(EncoderConfig(), store, EncoderMetrics(), lambda: None)
    server = grpc.aio.server(options=message_options(ServerLimits()))
    add_encoder_servicer(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            return await body(pb_grpc.EncoderStub(channel), channel)
    finally:
        await server.stop(None)


@pytest.fixture
def big_store():
    clock = Clock()
    store = EmbeddingStore(
        ExporterConfig(pool_bytes=1 << 20, block_bytes=BLOCK, ttl_s=10), 1 << 20, clock=clock
    )
    yield clock, store
    store.close()


@pytest.mark.parametrize("reader_host", [None, OTHER_HOST], ids=["pool_slot", "host_copy"])
def test_generated_stub_reads_the_exact_bytes_the_generated_serializer_would_send(
    big_store, reader_host
):
    _, store = big_store
    [loc] = store.put_all([ITEM], consumer_host=reader_host)
    assert loc.path == ("shm" if reader_host is None else "grpc_stream")
    request = convert.fetch_request(loc.embedding_id, 16 << 10)

    async def body(stub, channel):
        messages = [m async for m in stub.FetchEmbedding(request)]  # generated deserializer
        raw_call = channel.unary_stream(
            convert.FETCH_EMBEDDING_PATH,
            request_serializer=pb.FetchEmbeddingRequest.SerializeToString,
        )  # no deserializer: the replies' wire bytes
        return messages, [r async for r in raw_call(request)]

    messages, wires = asyncio.run(serve(store, body))
    data = item_bytes(ITEM)
    expected = [convert.chunk_message(c) for c in split_chunks(data, 16 << 10)]
    assert wires == [m.SerializeToString() for m in expected]  # byte for byte
    assert messages == expected
    assert b"".join(m.data for m in messages) == data
    assert all(m.HasField("crc32c") and m.crc32c == google_crc32c.value(m.data) for m in messages)


def test_cancelled_fetch_keeps_the_item_for_another_fetch_until_acked(big_store):
    _, store = big_store
    [loc] = store.put_all([ITEM])
    used = store.used_bytes
    request = convert.fetch_request(loc.embedding_id, 1024)  # 64 replies

    async def body(stub, channel):
        call = stub.FetchEmbedding(request)
        first = await call.read()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call.read()
        assert first.offset == 0 and first.data == item_bytes(ITEM)[:1024]
        assert store.used_bytes == used  # a reader that gave up does not free the item
        again = [m async for m in stub.FetchEmbedding(request)]
        ack = await stub.Ack(convert.ack_request([loc.embedding_id]))
        return again, ack

    again, ack = asyncio.run(serve(store, body))
    assert b"".join(m.data for m in again) == item_bytes(ITEM)
    assert (ack.acknowledged, ack.released) == (1, 1) and store.used_bytes == 0


def test_stale_ids_are_not_found_on_the_wire(big_store):
    _, store = big_store
    [loc] = store.put_all([ITEM])
    store.ack([loc.embedding_id])  # released

    async def body(stub, channel):
        codes = []
        for embedding_id in (loc.embedding_id, "glimpse-1-ab:0:99", "not-an-id"):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                [m async for m in stub.FetchEmbedding(convert.fetch_request(embedding_id))]
            codes.append(err.value.code())
        return codes

    assert asyncio.run(serve(store, body)) == [grpc.StatusCode.NOT_FOUND] * 3


# The pool's mapping must close cleanly afterwards: no view of it left alive by the error.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_slot_reused_mid_stream_is_data_loss_on_the_wire_without_foreign_bytes(
    big_store, monkeypatch
):
    clock, store = big_store
    mine = torch.zeros(64, 256)
    [loc] = store.put_all([mine])
    framed = []
    real_writer = convert.chunk_to_wire

    def writer(chunk):
        if len(framed) == 1:  # the slot expires and is reused before chunk 2 is copied out
            clock.now += 11
            store.sweep()
            [other] = store.put_all([torch.full((64, 256), 7.0)])
            assert other.offset == loc.offset
        framed.append(chunk.offset)
        return real_writer(chunk)

    monkeypatch.setattr(convert, "chunk_to_wire", writer)

    async def body(stub, channel):
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for m in stub.FetchEmbedding(convert.fetch_request(loc.embedding_id, 1024)):
                got.append(m)
        return got, err.value

    got, err = asyncio.run(serve(store, body))
    assert err.code() == grpc.StatusCode.DATA_LOSS and "expired" in err.details()
    assert [m.data for m in got] == [bytes(1024)]  # the new item's bytes never left
