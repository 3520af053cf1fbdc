"""``convert.chunk_from_wire`` / ``chunk_to_wire``: the FetchEmbedding reply read and written as
wire bytes.

The reader must give exactly what the generated parser gives for every message a producer can
send (old and new checksum fields, empty items, fields in any order, fields it does not know),
never copy the payload, and refuse bytes that are not a message. The writer must write exactly the
generated serializer's bytes (so every protobuf client reads them), from a view of the item whose
payload it copies.
"""

from __future__ import annotations

import os

import google_crc32c
import numpy as np
import pytest

from encoder_service import convert
from encoder_service.transport import EmbeddingChunk, StreamCutError, split_chunks
from encoder_service.transport.stream import ChunkAssembler, chunk_views
from protos import encoder_pb2 as pb


def _via_pb(raw: bytes) -> EmbeddingChunk:
    return convert.chunk_from_message(pb.EmbeddingChunk.FromString(raw))


def _same(a: EmbeddingChunk, b: EmbeddingChunk) -> None:
    assert (a.offset, a.total_bytes, a.crc32, a.crc32c) == (
        b.offset,
        b.total_bytes,
        b.crc32,
        b.crc32c,
    )
    assert bytes(a.data) == bytes(b.data)


def _tag(number: int, wire: int) -> bytes:
    return bytes([number << 3 | wire])


@pytest.mark.parametrize(
    "fields",
    [
        dict(offset=4 << 20, data=os.urandom(70_000), total_bytes=12 << 20, crc32c=0xFFFFFFFF),
        dict(offset=0, data=b"abc", total_bytes=3, crc32=123456789),  # an older producer
        dict(offset=7, data=b"xyz", total_bytes=10),  # a producer without checksums
        dict(offset=0, data=b"", total_bytes=0, crc32c=0),  # an empty item
        dict(offset=-5, data=b"q", total_bytes=-1),  # nonsense the assembler must still see
    ],
)
def test_wire_parse_equals_the_generated_parser(fields):
    raw = pb.EmbeddingChunk(**fields).SerializeToString()
    _same(convert.chunk_from_wire(raw), _via_pb(raw))


def test_field_order_unknown_fields_and_repeats_are_read_as_protobuf_reads_them():
    raw = b"".join(
        [
            _tag(5, 0) + b"\x07",  # crc32c = 7, before everything else
            _tag(9, 0) + b"\x96\x01",  # unknown varint
            _tag(10, 1) + b"\x00" * 8,  # unknown fixed64
            _tag(11, 5) + b"\x00" * 4,  # unknown fixed32
            _tag(12, 2) + b"\x03abc",  # unknown bytes
            _tag(2, 2) + b"\x02hi",
            _tag(3, 0) + b"\x05",
            _tag(1, 0) + b"\x01",
            _tag(1, 0) + b"\x03",  # a repeated scalar: the last one wins
            _tag(2, 2) + b"\x02ok",  # a repeated bytes field: the last one wins
        ]
    )
    got = convert.chunk_from_wire(raw)
    _same(got, _via_pb(raw))
    assert (got.offset, bytes(got.data), got.total_bytes, got.crc32c) == (3, b"ok", 5, 7)


def test_payload_is_a_read_only_view_of_the_received_bytes():
    raw = pb.EmbeddingChunk(
        offset=0, data=os.urandom(1 << 20), total_bytes=1 << 20
    ).SerializeToString()
    chunk = convert.chunk_from_wire(raw)
    assert isinstance(chunk.data, np.ndarray) and chunk.data.base is raw  # no copy was made
    assert not chunk.data.flags.writeable


@pytest.mark.parametrize(
    "raw",
    [
        _tag(1, 0) + b"\x80",  # varint cut short
        _tag(1, 0) + b"\xff" * 11,  # varint longer than 64 bits
        _tag(2, 2) + b"\x10abc",  # bytes field longer than the message
        _tag(10, 1) + b"\x00" * 3,  # fixed64 cut short
        _tag(6, 3),  # groups are not part of this message
        b"\x00\x01",  # field number 0
    ],
)
def test_malformed_bytes_are_refused(raw):
    with pytest.raises(ValueError):
        convert.chunk_from_wire(raw)


def test_wire_chunks_assemble_bit_exact_and_a_flipped_byte_fails_its_checksum():
    data = os.urandom(50_000)
    wires = [convert.chunk_message(c).SerializeToString() for c in split_chunks(data, 8192)]
    assembler = ChunkAssembler(len(data))
    for raw in wires:
        assembler.add(convert.chunk_from_wire(raw))
    assert assembler.finish() == data

    broken = bytearray(wires[2])
    broken[len(broken) // 2] ^= 0x01  # inside the payload: only the checksum can tell
    assembler = ChunkAssembler(len(data))
    for raw in wires[:2]:
        assembler.add(convert.chunk_from_wire(raw))
    with pytest.raises(StreamCutError, match="checksum"):
        assembler.add(convert.chunk_from_wire(bytes(broken)))
    assert google_crc32c.value(data[:8192]) == convert.chunk_from_wire(wires[0]).crc32c


@pytest.mark.parametrize(
    "fields",
    [
        dict(offset=4 << 20, data=os.urandom(70_000), total_bytes=12 << 20, crc32c=0xFFFFFFFF),
        dict(offset=0, data=os.urandom(1 << 20), total_bytes=1 << 20, crc32c=0),  # crc 0 is set
        dict(offset=0, data=b"abc", total_bytes=3, crc32=123456789),  # the old checksum
        dict(offset=3, data=b"abc", total_bytes=9, crc32=1, crc32c=2),  # both checksums
        dict(offset=7, data=b"xyz", total_bytes=10),  # no checksum
        dict(offset=0, data=b"", total_bytes=0, crc32c=0),  # an empty item
        dict(offset=1 << 40, data=b"\x00" * 200, total_bytes=(1 << 40) + 200),  # long varints
        dict(offset=-5, data=b"q", total_bytes=-1),  # negative int64: ten-byte varints
    ],
)
def test_wire_writer_writes_the_generated_serializers_bytes(fields):
    chunk = EmbeddingChunk(**fields)
    raw = convert.chunk_to_wire(chunk)
    assert isinstance(raw, bytes)
    assert raw == convert.chunk_message(chunk).SerializeToString()
    _same(_via_pb(raw), chunk)  # the generated parser, checksum presence included
    _same(convert.chunk_from_wire(raw), chunk)


def test_wire_writer_copies_the_payload_out_of_the_memory_it_views():
    pool = bytearray(os.urandom(3 * 4096))  # stands in for a pool slot
    wires = [convert.chunk_to_wire(c) for c in chunk_views(memoryview(pool), 4096)]
    expected = [convert.chunk_message(c).SerializeToString() for c in split_chunks(pool, 4096)]
    pool[:] = bytes(len(pool))  # the slot is reused after the chunks were framed
    assert wires == expected


def test_chunk_views_do_not_copy_and_cannot_write_the_pool():
    pool = bytearray(os.urandom(5000))
    chunks = list(chunk_views(memoryview(pool), 1024))
    assert [len(c.data) for c in chunks] == [1024] * 4 + [904]
    assert [c.crc32c for c in chunks] == [c.crc32c for c in split_chunks(pool, 1024)]
    assert not chunks[0].data.flags.writeable
    pool[0] ^= 0xFF
    assert chunks[0].data[0] == pool[0]  # a view, not a copy


def test_reply_serializer_passes_wire_bytes_through_and_serializes_messages():
    raw = convert.chunk_to_wire(EmbeddingChunk(offset=0, data=b"abc", total_bytes=3, crc32c=1))
    assert convert.serialize_chunk_reply(raw) is raw
    msg = pb.EmbeddingChunk(offset=0, data=b"abc", total_bytes=3, crc32c=1)
    assert convert.serialize_chunk_reply(msg) == raw
