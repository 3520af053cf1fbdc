"""The only module that touches ``encoder_pb2``: proto messages <-> internal dataclasses.

Contract (server side): ``items_from_request`` turns an ``EncodeRequest`` into ``MediaItem``s,
refusing malformed items with ``EncodeError(INVALID)`` that names the item, and
``consumer_host`` reads the reader's host identity; ``encode_response`` (from the transport's
``EmbeddingLocation``s), ``chunk_message`` and ``ack_response`` build replies, and
``chunk_to_wire`` writes a ``FetchEmbedding`` reply's wire bytes by hand (the payload copied once,
from a view of the item; ``serialize_chunk_reply`` is that method's pass-through response
serializer). Client side:
``encode_request``, ``descriptors_from_response``, ``location_from_message`` (raises the
transport's ``DescriptorError`` for a location that contradicts itself), ``chunk_from_message``,
``chunk_from_wire`` (the ``FetchEmbedding`` reply read straight from its wire bytes, payload not
copied), ``fetch_request`` and ``ack_request``. No I/O, no policy beyond field shape checks
(limits that depend on the model are checked by the pipeline).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from encoder_service.errors import invalid
from encoder_service.items import (
    EmbeddingDescriptor,
    EncodedItem,
    MediaItem,
    MediaOptions,
    Modality,
)
from encoder_service.transport import (
    DescriptorError,
    EmbeddingChunk,
    EmbeddingLocation,
    HostIdentity,
)
from protos import encoder_pb2 as pb

_MODALITY_IN = {pb.MODALITY_IMAGE: Modality.IMAGE, pb.MODALITY_VIDEO: Modality.VIDEO}
_MODALITY_OUT = {v: k for k, v in _MODALITY_IN.items()}
_TRANSPORT_OUT = {
    "grpc_stream": pb.TRANSPORT_GRPC_STREAM,
    "shm": pb.TRANSPORT_SHM,
    "cuda_ipc": pb.TRANSPORT_CUDA_IPC,
}
_TRANSPORT_IN = {v: k for k, v in _TRANSPORT_OUT.items()}
# Host id of a streamed item whose encoder did not name its host: streaming needs none.
_NO_HOST = "unknown/unknown"


def items_from_request(request: pb.EncodeRequest, max_items: int) -> list[MediaItem]:
    if not request.items:
        raise invalid("EncodeRequest has no items")
    if len(request.items) > max_items:
        raise invalid(f"EncodeRequest has {len(request.items)} items; the limit is {max_items}")
    return [_item(i, msg) for i, msg in enumerate(request.items)]


def consumer_host(request: pb.EncodeRequest) -> HostIdentity | None:
    """The reader's host identity, None when the request does not name one."""
    if not request.consumer_host_id:
        return None
    try:
        return HostIdentity.from_key(request.consumer_host_id)
    except ValueError:
        shown = request.consumer_host_id[:96]
        raise invalid(f"consumer_host_id {shown!r} is not of the form hostname/boot_id") from None


def _item(index: int, msg: pb.MediaItem) -> MediaItem:
    label = f"item {index}"
    modality = _MODALITY_IN.get(msg.modality)
    if modality is None:
        raise invalid(f"{label}: modality must be MODALITY_IMAGE or MODALITY_VIDEO")
    opts = msg.options
    if opts.min_pixels < 0 or opts.max_pixels < 0 or opts.max_frames < 0:
        raise invalid(f"{label}: options must not be negative")
    if opts.min_pixels and opts.max_pixels and opts.min_pixels > opts.max_pixels:
        raise invalid(f"{label}: options.min_pixels is above options.max_pixels")
    if not math.isfinite(opts.fps) or opts.fps < 0:
        raise invalid(f"{label}: options.fps must be a finite, non-negative number")
    options = MediaOptions(
        min_pixels=int(opts.min_pixels),
        max_pixels=int(opts.max_pixels),
        fps=float(opts.fps),
        max_frames=int(opts.max_frames),
    )
    source = msg.WhichOneof("source")
    if source == "data":
        return MediaItem(index, modality, data=bytes(msg.data), options=options)
    if source == "url":
        if not msg.url:
            raise invalid(f"{label}: url is empty")
        return MediaItem(index, modality, url=msg.url, options=options)
    raise invalid(f"{label}: set either data or url")


def _location_message(where: EmbeddingLocation) -> pb.EmbeddingLocation:
    d = where.to_dict()
    msg = pb.EmbeddingLocation(
        embedding_id=d["embedding_id"],
        transport=_TRANSPORT_OUT[d["transport"]],
        ttl_s=d["ttl_s"],
        host_id=d["host_id"],
    )
    if where.path != "grpc_stream":
        msg.pool_id = where.key.pool_id
        msg.offset = d["offset"]
        msg.generation = where.key.generation
    return msg


def encode_response(
    encoded: Sequence[EncodedItem], stored: Sequence[EmbeddingLocation]
) -> pb.EncodeResponse:
    response = pb.EncodeResponse()
    for item, where in zip(encoded, stored, strict=True):
        t, h, w = item.grid_thw
        response.items.append(
            pb.EmbeddingDescriptor(
                content_hash=item.content_hash,
                num_tokens=item.num_tokens,
                grid_thw=pb.GridTHW(t=t, h=h, w=w),
                timestamps=list(item.timestamps),
                modality=_MODALITY_OUT[item.modality],
                cache_hit=item.cache_hit,
                tensor=pb.TensorSpec(dtype=where.dtype, shape=where.shape, nbytes=where.nbytes),
                location=_location_message(where),
            )
        )
    return response


def chunk_message(chunk: EmbeddingChunk) -> pb.EmbeddingChunk:
    msg = pb.EmbeddingChunk(offset=chunk.offset, data=chunk.data, total_bytes=chunk.total_bytes)
    if chunk.crc32c is not None:
        msg.crc32c = chunk.crc32c
    if chunk.crc32 is not None:
        msg.crc32 = chunk.crc32
    return msg


def ack_response(acknowledged: int, released: int) -> pb.AckResponse:
    return pb.AckResponse(acknowledged=acknowledged, released=released)


def encode_request(
    items: Sequence[MediaItem], num_consumers: int = 1, consumer_host_id: str = ""
) -> pb.EncodeRequest:
    request = pb.EncodeRequest(num_consumers=num_consumers, consumer_host_id=consumer_host_id)
    for item in items:
        o = item.options
        msg = pb.MediaItem(
            modality=_MODALITY_OUT[item.modality],
            options=pb.MediaOptions(
                min_pixels=o.min_pixels, max_pixels=o.max_pixels, fps=o.fps, max_frames=o.max_frames
            ),
        )
        if item.url is not None:
            msg.url = item.url
        else:
            msg.data = item.data or b""
        request.items.append(msg)
    return request


def descriptors_from_response(response: pb.EncodeResponse) -> list[EmbeddingDescriptor]:
    return [
        EmbeddingDescriptor(
            content_hash=d.content_hash,
            num_tokens=d.num_tokens,
            grid_thw=(d.grid_thw.t, d.grid_thw.h, d.grid_thw.w),
            timestamps=tuple(d.timestamps),
            modality=_MODALITY_IN[d.modality],
            cache_hit=d.cache_hit,
            dtype=d.tensor.dtype,
            shape=tuple(d.tensor.shape),
            nbytes=d.tensor.nbytes,
            embedding_id=d.location.embedding_id,
            transport=_TRANSPORT_IN.get(d.location.transport, "unknown"),
            ttl_s=d.location.ttl_s,
        )
        for d in response.items
    ]


def location_from_message(d: pb.EmbeddingDescriptor) -> EmbeddingLocation:
    """Where one reply item lies, as the transport's importer reads it."""
    loc = d.location
    path = _TRANSPORT_IN.get(loc.transport)
    name = loc.embedding_id[:96]
    if path is None:
        raise DescriptorError(f"embedding {name!r}: unknown transport {loc.transport}")
    location = EmbeddingLocation.from_dict(
        {
            "embedding_id": loc.embedding_id,
            "transport": path,
            "host_id": loc.host_id or _NO_HOST,
            "offset": loc.offset,
            "nbytes": d.tensor.nbytes,
            "dtype": d.tensor.dtype,
            "shape": list(d.tensor.shape),
            "ttl_s": loc.ttl_s,
        }
    )
    key = location.key
    if path != "grpc_stream" and (loc.pool_id, loc.generation) != (key.pool_id, key.generation):
        raise DescriptorError(f"embedding {name!r}: pool_id/generation contradict embedding_id")
    return location


def chunk_from_message(msg: pb.EmbeddingChunk) -> EmbeddingChunk:
    return EmbeddingChunk(
        offset=msg.offset,
        data=msg.data,
        total_bytes=msg.total_bytes,
        crc32=msg.crc32 if msg.HasField("crc32") else None,
        crc32c=msg.crc32c if msg.HasField("crc32c") else None,
    )


# The FetchEmbedding method path, for a client that reads its replies with ``chunk_from_wire``.
ENCODER_SERVICE = pb.DESCRIPTOR.services_by_name["Encoder"].full_name
FETCH_EMBEDDING_PATH = f"/{ENCODER_SERVICE}/FetchEmbedding"

# EmbeddingChunk field numbers (protos/encoder.proto) and protobuf wire types.
_OFFSET, _DATA, _TOTAL_BYTES, _CRC32, _CRC32C = 1, 2, 3, 4, 5
_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(raw) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _int64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def chunk_from_wire(raw: bytes) -> EmbeddingChunk:
    """A serialized ``EmbeddingChunk`` as the transport's chunk, ``data`` a read-only view of
    ``raw`` (no copy: the assembler copies it once, into the destination tensor).

    Same result as ``chunk_from_message(pb.EmbeddingChunk.FromString(raw))``, which copies a
    multi-MiB payload twice (into the message, then out of it as ``bytes``); unknown fields are
    skipped and a repeated field keeps its last value, as protobuf does. Raises ValueError on
    input that is not a well-formed message.
    """
    fields: dict[int, int] = {}
    data_at, data_len = 0, 0
    pos, end = 0, len(raw)
    while pos < end:
        tag, pos = _varint(raw, pos)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == _VARINT:
            fields[number], pos = _varint(raw, pos)
        elif wire == _LEN:
            length, pos = _varint(raw, pos)
            if pos + length > end:
                raise ValueError("length-delimited field runs past the message")
            if number == _DATA:
                data_at, data_len = pos, length
            pos += length
        elif wire in (_FIXED64, _FIXED32):
            pos += 8 if wire == _FIXED64 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > end:
            raise ValueError("field runs past the message")
    data = np.frombuffer(raw, dtype=np.uint8, count=data_len, offset=data_at)
    crc32, crc32c = fields.get(_CRC32), fields.get(_CRC32C)
    return EmbeddingChunk(
        offset=_int64(fields.get(_OFFSET, 0)),
        data=data,
        total_bytes=_int64(fields.get(_TOTAL_BYTES, 0)),
        crc32=crc32 & 0xFFFFFFFF if crc32 is not None else None,
        crc32c=crc32c & 0xFFFFFFFF if crc32c is not None else None,
    )


def _put_varint(out: bytearray, value: int) -> None:
    value &= (1 << 64) - 1  # a negative int64 is its two's complement: ten bytes, as protobuf
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def chunk_to_wire(chunk: EmbeddingChunk) -> bytes:
    """``chunk`` as a serialized ``EmbeddingChunk``, written by hand around its payload.

    The same bytes as ``chunk_message(chunk).SerializeToString()`` (fields in number order,
    proto3 defaults left out, the optional checksums written whenever set), so any protobuf
    reader parses it; but ``data`` (a view of the pool or of the held copy) is copied once, into
    the reply itself, where building and serializing the message copied it twice more.
    """
    data = memoryview(chunk.data).cast("B")
    head = bytearray()  # fields 1-2: offset, then data's tag and length
    if chunk.offset:
        head.append(_OFFSET << 3 | _VARINT)
        _put_varint(head, chunk.offset)
    if data.nbytes:
        head.append(_DATA << 3 | _LEN)
        _put_varint(head, data.nbytes)
    tail = bytearray()  # fields 3-5, after the payload
    if chunk.total_bytes:
        tail.append(_TOTAL_BYTES << 3 | _VARINT)
        _put_varint(tail, chunk.total_bytes)
    for number, crc in ((_CRC32, chunk.crc32), (_CRC32C, chunk.crc32c)):
        if crc is not None:
            tail.append(number << 3 | _VARINT)
            _put_varint(tail, crc & 0xFFFFFFFF)
    return b"".join((head, data, tail))  # one allocation, the payload's one copy


def serialize_chunk_reply(reply: bytes | pb.EmbeddingChunk) -> bytes:
    """FetchEmbedding's response serializer: wire bytes (``chunk_to_wire``) pass through as they
    are; a message is serialized as the generated handler would."""
    if isinstance(reply, bytes):
        return reply
    return reply.SerializeToString()


def fetch_request(embedding_id: str, chunk_bytes: int = 0) -> pb.FetchEmbeddingRequest:
    return pb.FetchEmbeddingRequest(embedding_id=embedding_id, chunk_bytes=chunk_bytes)


def ack_request(embedding_ids: Sequence[str], consumer: str = "") -> pb.AckRequest:
    return pb.AckRequest(embedding_ids=list(embedding_ids), consumer=consumer)
