"""The grpc_stream path end to end over a real grpc.aio server in another process.

The decoder side here claims another host identity, so the importer picks grpc_stream on its own.
The server's FetchCut / FetchAbort methods play a producer whose stream breaks halfway.
"""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from transport_workers import GrpcClient, GrpcExporterServer, seeded_embedding

from encoder_service.transport import (
    EmbeddingImporter,
    EmbeddingLocation,
    HostIdentity,
    PoolUnavailableError,
    StaleSlotError,
    StreamCutError,
    grpc_status,
)

ROWS, HIDDEN = 16, 128
CONFIG = {"pool_bytes": 8 * 4096, "block_bytes": 4096, "ttl_s": 30.0, "chunk_bytes": 1024}
REMOTE = HostIdentity(boot_id="another-boot", hostname="decoder-node")


@pytest.fixture(scope="module")
def server():
    srv = GrpcExporterServer(CONFIG)
    yield srv
    srv.stop()


def _run(server, body):
    async def main():
        client = GrpcClient(server.target)
        try:
            with EmbeddingImporter(host=REMOTE) as importer:
                return await body(client, importer)
        finally:
            await client.close()

    return asyncio.run(main())


def test_grpc_stream_is_bit_exact_including_a_full_size_image(server):
    async def body(client, importer):
        small = EmbeddingLocation.from_dict(await client.put(ROWS, HIDDEN, 7))
        got = await importer.fetch(small, client.fetch_fn(chunk_bytes=1024))
        assert torch.equal(got, seeded_embedding(ROWS, HIDDEN, 7))
        # One 1120x1120 image: 1600 x 4096 bf16 = 12.5 MiB, several 4 MiB chunks.
        big = EmbeddingLocation.from_dict(await client.put(1600, 4096, 8))
        got = await importer.fetch(big, client.fetch_fn())
        assert torch.equal(got, seeded_embedding(1600, 4096, 8))
        assert importer.stats.fetches["grpc_stream"] == 2
        assert (await client.ack(big.embedding_id))["released"]

    _run(server, body)


def test_concurrent_streams_land_in_the_right_requests(server):
    async def body(client, importer):
        seeds = list(range(200, 210))
        rows = {s: ROWS * (1 + s % 4) for s in seeds}
        locs = {s: EmbeddingLocation.from_dict(await client.put(rows[s], HIDDEN, s)) for s in seeds}
        order = seeds[:]
        random.Random(1).shuffle(order)
        fetch = client.fetch_fn(chunk_bytes=1024)
        results = await asyncio.gather(*(importer.fetch(locs[s], fetch) for s in order))
        for s, got in zip(order, results, strict=True):
            assert torch.equal(got, seeded_embedding(rows[s], HIDDEN, s))
        for s in seeds:
            await client.ack(locs[s].embedding_id)

    _run(server, body)


@pytest.mark.parametrize("method", ["FetchCut", "FetchAbort"])
def test_cut_stream_fails_that_request_with_data_loss_and_others_still_work(server, method):
    async def body(client, importer):
        loc = EmbeddingLocation.from_dict(await client.put(ROWS * 4, HIDDEN, 3))
        with pytest.raises(StreamCutError) as err:
            await importer.fetch(loc, client.fetch_fn(method, chunk_bytes=1024))
        assert grpc_status(err.value).name == "DATA_LOSS"
        got = await importer.fetch(loc, client.fetch_fn(chunk_bytes=1024))
        assert torch.equal(got, seeded_embedding(ROWS * 4, HIDDEN, 3))
        await client.ack(loc.embedding_id)

    _run(server, body)


def test_released_or_expired_item_is_data_loss_over_the_stream(server):
    async def body(client, importer):
        acked = EmbeddingLocation.from_dict(await client.put(ROWS, HIDDEN, 4, consumers=2))
        await client.ack(acked.embedding_id, "rank0")
        await client.ack(acked.embedding_id, "rank0")  # a retry must not count as rank1
        got = await importer.fetch(acked, client.fetch_fn())
        assert torch.equal(got, seeded_embedding(ROWS, HIDDEN, 4))
        await client.ack(acked.embedding_id, "rank1")
        with pytest.raises(StaleSlotError):
            await importer.fetch(acked, client.fetch_fn())
        expiring = EmbeddingLocation.from_dict(await client.put(ROWS, HIDDEN, 5))
        await client.advance(CONFIG["ttl_s"] + 1)
        await client.put(ROWS, HIDDEN, 6)  # allocation sweeps the expired item
        with pytest.raises(StaleSlotError) as err:
            await importer.fetch(expiring, client.fetch_fn())
        assert grpc_status(err.value).name == "DATA_LOSS"

    _run(server, body)


def test_unreachable_encoder_is_unavailable():
    async def body():
        client = GrpcClient("127.0.0.1:1")
        loc = EmbeddingLocation.from_dict(
            {
                "embedding_id": "glimpse-1-dead:-1:1",
                "transport": "grpc_stream",
                "host_id": REMOTE.key,
                "offset": 0,
                "nbytes": 4,
                "dtype": "float32",
                "shape": [1, 1],
            }
        )
        try:
            with pytest.raises(PoolUnavailableError) as err:
                await EmbeddingImporter().fetch(loc, client.fetch_fn())
        finally:
            await client.close()
        assert grpc_status(err.value).name == "UNAVAILABLE"

    asyncio.run(body())
