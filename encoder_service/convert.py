"""The only module that touches ``encoder_pb2``: proto messages <-> internal dataclasses.

Contract (server side): ``items_from_request`` turns an ``EncodeRequest`` into ``MediaItem``s,
refusing malformed items with ``EncodeError(INVALID)`` that names the item; ``encode_response``,
``chunk_message`` and ``ack_response`` build replies. Client side: ``encode_request`` and
``descriptors_from_response``. No I/O, no policy beyond field shape
checks (limits that depend on the model are checked by the pipeline).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from encoder_service.errors import invalid
from encoder_service.items import (
    EmbeddingDescriptor,
    EncodedItem,
    MediaItem,
    MediaOptions,
    Modality,
    StoredEmbedding,
)
from protos import encoder_pb2 as pb

_MODALITY_IN = {pb.MODALITY_IMAGE: Modality.IMAGE, pb.MODALITY_VIDEO: Modality.VIDEO}
_MODALITY_OUT = {v: k for k, v in _MODALITY_IN.items()}
_TRANSPORT_OUT = {"grpc_stream": pb.TRANSPORT_GRPC_STREAM}
_TRANSPORT_IN = {v: k for k, v in _TRANSPORT_OUT.items()}


def items_from_request(request: pb.EncodeRequest, max_items: int) -> list[MediaItem]:
    if not request.items:
        raise invalid("EncodeRequest has no items")
    if len(request.items) > max_items:
        raise invalid(f"EncodeRequest has {len(request.items)} items; the limit is {max_items}")
    return [_item(i, msg) for i, msg in enumerate(request.items)]


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


def encode_response(
    encoded: Sequence[EncodedItem], stored: Sequence[StoredEmbedding]
) -> pb.EncodeResponse:
    response = pb.EncodeResponse()
    for item, where in zip(encoded, stored, strict=True):
        t, h, w = item.grid_thw
        emb = item.embedding
        response.items.append(
            pb.EmbeddingDescriptor(
                content_hash=item.content_hash,
                num_tokens=item.num_tokens,
                grid_thw=pb.GridTHW(t=t, h=h, w=w),
                timestamps=list(item.timestamps),
                modality=_MODALITY_OUT[item.modality],
                cache_hit=item.cache_hit,
                tensor=pb.TensorSpec(
                    dtype=str(emb.dtype).removeprefix("torch."),
                    shape=list(emb.shape),
                    nbytes=emb.numel() * emb.element_size(),
                ),
                location=pb.EmbeddingLocation(
                    embedding_id=where.embedding_id,
                    transport=_TRANSPORT_OUT[where.transport],
                    ttl_s=where.ttl_s,
                ),
            )
        )
    return response


def chunk_message(offset: int, data: bytes, total_bytes: int) -> pb.EmbeddingChunk:
    return pb.EmbeddingChunk(offset=offset, data=data, total_bytes=total_bytes)


def ack_response(acknowledged: int, released: int) -> pb.AckResponse:
    return pb.AckResponse(acknowledged=acknowledged, released=released)


def encode_request(items: Sequence[MediaItem], num_consumers: int = 1) -> pb.EncodeRequest:
    request = pb.EncodeRequest(num_consumers=num_consumers)
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


def fetch_request(embedding_id: str, chunk_bytes: int = 0) -> pb.FetchEmbeddingRequest:
    return pb.FetchEmbeddingRequest(embedding_id=embedding_id, chunk_bytes=chunk_bytes)


def ack_request(embedding_ids: Sequence[str]) -> pb.AckRequest:
    return pb.AckRequest(embedding_ids=list(embedding_ids))
