"""Descriptor wire form and grpc_stream chunking: round trips, and every kind of broken stream."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import zlib

import google_crc32c
import pytest

from encoder_service.transport import (
    DescriptorError,
    EmbeddingChunk,
    EmbeddingKey,
    EmbeddingLocation,
    HostIdentity,
    StreamCutError,
    assemble,
    grpc_status,
    split_chunks,
)
from encoder_service.transport.stream import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES


def _location(**overrides) -> EmbeddingLocation:
    fields = dict(
        path="shm",
        key=EmbeddingKey("glimpse-1-abcd", 3, 42),
        host=HostIdentity(boot_id="b00t", hostname="node-a"),
        offset=3 * 4096,
        nbytes=16 * 8 * 2,
        dtype="bfloat16",
        shape=(16, 8),
        ttl_s=30.0,
    )
    fields.update(overrides)
    return EmbeddingLocation(**fields)


def test_location_round_trips_through_its_dict_form():
    loc = _location()
    d = loc.to_dict()
    assert d["embedding_id"] == "glimpse-1-abcd:3:42"
    assert EmbeddingLocation.from_dict(d) == loc
    assert EmbeddingKey.parse(d["embedding_id"]) == loc.key


@pytest.mark.parametrize(
    "change",
    [
        {"transport": "rdma"},
        {"dtype": "int8"},
        {"nbytes": 7},
        {"shape": [16, -8]},
        {"offset": -1},
        {"embedding_id": "no-colons"},
        {"embedding_id": "p:0:0"},
        {"host_id": "nohost"},
    ],
)
def test_malformed_location_dicts_are_rejected(change):
    d = dict(_location().to_dict(), **change)
    with pytest.raises(DescriptorError) as err:
        EmbeddingLocation.from_dict(d)
    assert grpc_status(err.value).name == "DATA_LOSS"


def _chunks(data: bytes, step: int) -> list[EmbeddingChunk]:
    return list(split_chunks(data, step))


@pytest.mark.parametrize("size", [0, 1, MIN_CHUNK_BYTES - 1, MIN_CHUNK_BYTES, 10_000, 65_537])
def test_split_then_assemble_is_identity_and_chunks_are_bounded(size):
    data = os.urandom(size)
    chunks = _chunks(data, MIN_CHUNK_BYTES)
    assert all(len(c.data) <= MIN_CHUNK_BYTES for c in chunks)
    assert all(c.crc32c == google_crc32c.value(c.data) and c.crc32 is None for c in chunks)
    assert asyncio.run(assemble(chunks, size)) == data


def test_chunk_size_is_clamped_to_the_bounds():
    data = os.urandom(MAX_CHUNK_BYTES + 10)
    assert max(len(c.data) for c in split_chunks(data, 1 << 30)) == MAX_CHUNK_BYTES
    assert max(len(c.data) for c in split_chunks(data[:5000], 10)) == MIN_CHUNK_BYTES


def test_async_iterables_such_as_grpc_calls_are_accepted():
    data = os.urandom(5000)

    async def gen():
        for c in _chunks(data, 1024):
            yield c

    assert asyncio.run(assemble(gen(), len(data))) == data


def _broken(kind: str, data: bytes) -> list[EmbeddingChunk]:
    chunks = _chunks(data, 1024)
    if kind == "cut":
        return chunks[:-1]
    if kind == "gap":
        return chunks[:1] + chunks[2:]
    if kind == "reorder":
        return [chunks[1], chunks[0], *chunks[2:]]
    if kind == "corrupt":
        bad = bytes([chunks[1].data[0] ^ 0xFF]) + chunks[1].data[1:]
        return [chunks[0], dataclasses.replace(chunks[1], data=bad), *chunks[2:]]
    if kind == "total":
        return [dataclasses.replace(c, total_bytes=c.total_bytes + 1) for c in chunks]
    if kind == "overrun":
        extra = EmbeddingChunk(len(data), b"x", len(data), crc32c=google_crc32c.value(b"x"))
        return [*chunks, extra]
    raise AssertionError(kind)


def test_chunks_from_an_older_producer_with_zlib_crc32_are_verified():
    data = os.urandom(3000)
    old = [
        EmbeddingChunk(c.offset, c.data, c.total_bytes, crc32=zlib.crc32(c.data))
        for c in split_chunks(data, 1024, checksum=False)
    ]
    assert asyncio.run(assemble(old, len(data))) == data
    bad = bytes([old[1].data[0] ^ 0xFF]) + old[1].data[1:]
    old[1] = dataclasses.replace(old[1], data=bad)
    with pytest.raises(StreamCutError, match="checksum"):
        asyncio.run(assemble(old, len(data)))


@pytest.mark.parametrize("kind", ["cut", "gap", "reorder", "corrupt", "total", "overrun"])
def test_broken_streams_raise_data_loss(kind):
    data = os.urandom(4000)
    with pytest.raises(StreamCutError) as err:
        asyncio.run(assemble(_broken(kind, data), len(data)))
    assert grpc_status(err.value).name == "DATA_LOSS"


def test_chunks_without_checksums_still_validate_length():
    data = os.urandom(3000)
    chunks = list(split_chunks(data, 1024, checksum=False))
    assert all(c.crc32 is None and c.crc32c is None for c in chunks)
    assert asyncio.run(assemble(chunks, len(data))) == data
    with pytest.raises(StreamCutError):
        asyncio.run(assemble(chunks[:2], len(data)))


def test_stream_channel_options_raise_frames_and_window_and_keep_them_in_the_client():
    from encoder_service.client import channel_options
    from encoder_service.transport.stream import grpc_message_options

    opts = dict(grpc_message_options())
    assert opts["grpc.http2.max_frame_size"] == (1 << 24) - 1  # HTTP/2's largest frame
    assert opts["grpc.http2.lookahead_bytes"] >= 16 << 20
    assert opts["grpc.http2.bdp_probe"] == 0
    client = dict(channel_options(128 << 20))
    # message limits rise to the configured size; the HTTP/2 settings pass through untouched
    assert client["grpc.max_receive_message_length"] == 128 << 20
    assert client["grpc.http2.max_frame_size"] == opts["grpc.http2.max_frame_size"]
    assert client["grpc.http2.bdp_probe"] == 0
