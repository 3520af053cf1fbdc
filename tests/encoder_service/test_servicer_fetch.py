"""FetchEmbedding in the servicer: statuses for gone items, and a slot reused mid-stream.

The servicer is driven directly with a stand-in context whose ``abort`` records the status, and a
store on a fake clock, so expiry happens exactly between two chunks.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from encoder_service.config import EncoderConfig
from encoder_service.metrics import EncoderMetrics
from encoder_service.servicer import EncoderServicer
from encoder_service.store import EmbeddingStore
from encoder_service.transport import ExporterConfig
from protos import encoder_pb2 as pb

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
            chunks.append(chunk)
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
