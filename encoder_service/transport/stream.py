"""The ``grpc_stream`` path: bounded chunks out, validated reassembly in.

Producer: ``chunk_views`` cuts an item's bytes into chunks of at most ``chunk_bytes`` (default
4 MiB, clamped to [1 KiB, 4 MiB]), each carrying its offset, the item's total size and a CRC-32C
of its bytes (hardware-accelerated: zlib's CRC-32 ran at about 1.4 GB/s and cost more than the
transfer); their ``data`` views the item's memory, so whoever frames a chunk (the encoder writes
the reply message around it, ``convert.chunk_to_wire``) makes the one copy of the payload.
``split_chunks`` is the same with each chunk's bytes copied out (``copy_chunk``). Flow control is
gRPC's own: a server-streaming handler that yields these lazily never holds more than one chunk
beyond what the transport buffered.

Consumer: ``assemble`` reads chunks (an async or sync iterable of anything with ``offset``,
``data``, ``total_bytes`` and optionally ``crc32c`` / ``crc32``, so generated proto messages work
as they are; ``data`` may be ``bytes`` or a read-only uint8 array viewing the received message,
see ``convert.chunk_from_wire``) into one uninitialized buffer, one copy per chunk, and checks
that offsets are contiguous, totals agree, checksums match and the stream did not end early.
Any violation is a ``StreamCutError`` (DATA_LOSS). A gRPC error in the middle of a stream is a
cut too; before the first chunk it means the producer is unreachable (UNAVAILABLE) or the item
is gone (DATA_LOSS); deadline and cancellation errors pass through untouched.

Message limits: a chunk message is a little larger than its payload, so both ends must raise
gRPC's 4 MiB default; ``grpc_message_options()`` gives the channel/server options to use.

Not here: deciding when to stream (importer.py), finding the item (exporter.py).
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import google_crc32c
import grpc
import numpy as np

from encoder_service.transport.errors import PoolUnavailableError, StaleSlotError, StreamCutError

MIN_CHUNK_BYTES = 1 << 10
MAX_CHUNK_BYTES = 4 << 20
DEFAULT_CHUNK_BYTES = MAX_CHUNK_BYTES
# Room for the message framing and the small fields beside the payload.
_MESSAGE_OVERHEAD = 64 << 10
_MAX_HTTP2_FRAME = (1 << 24) - 1  # the largest frame HTTP/2 allows
_STREAM_WINDOW = 64 << 20


@dataclass(frozen=True)
class EmbeddingChunk:
    offset: int  # byte offset of data in the item
    # The chunk's bytes: ``bytes`` once copied out; a [n] uint8 array viewing the item (from
    # ``chunk_views``) or the received message (read from the wire in place).
    data: bytes | np.ndarray
    total_bytes: int  # the item's size; lets the reader detect a cut stream
    crc32: int | None = None  # zlib CRC-32 of data, from older producers; verified when present
    crc32c: int | None = None  # CRC-32C of data; None when the producer sends no checksum


def clamp_chunk_bytes(requested: int | None) -> int:
    if not requested:
        return DEFAULT_CHUNK_BYTES
    return max(MIN_CHUNK_BYTES, min(MAX_CHUNK_BYTES, int(requested)))


def grpc_message_options(chunk_bytes: int = MAX_CHUNK_BYTES) -> list[tuple[str, int]]:
    """Channel and server options that admit chunks of ``chunk_bytes`` in both directions and
    let a stream run at memory speed rather than at HTTP/2's defaults: frames as large as the
    protocol allows (16 KiB by default, so a 4 MiB chunk was 256 frames) and a fixed 64 MiB
    flow-control window (no bandwidth-delay probing that starts small and grows)."""
    limit = chunk_bytes + _MESSAGE_OVERHEAD
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.http2.max_frame_size", _MAX_HTTP2_FRAME),
        ("grpc.http2.lookahead_bytes", _STREAM_WINDOW),
        ("grpc.http2.bdp_probe", 0),
    ]


def chunk_views(
    data: bytes | bytearray | memoryview, chunk_bytes: int | None = None, checksum: bool = True
) -> Iterator[EmbeddingChunk]:
    """Yield ``data`` as bounded chunks whose ``data`` is a read-only [n] uint8 array viewing
    it (nothing copied).

    NOTE: a view is only as good as the memory under it: a pool slot can be freed and reused
    while its chunks are streamed, so a caller copies each one out before it checks that the
    item is still live (``EmbeddingExporter.stream_chunks``).
    """
    # Read-only, so no framing can write into a pool slot; an array, not a memoryview, because
    # google_crc32c refuses memoryviews.
    items = np.frombuffer(memoryview(data).cast("B").toreadonly(), dtype=np.uint8)
    step = clamp_chunk_bytes(chunk_bytes)
    total = len(items)
    if total == 0:
        yield EmbeddingChunk(offset=0, data=b"", total_bytes=0, crc32c=0 if checksum else None)
        return
    for start in range(0, total, step):
        piece = items[start : start + step]  # [<= step] u8, a view
        crc = google_crc32c.value(piece) if checksum else None
        yield EmbeddingChunk(offset=start, data=piece, total_bytes=total, crc32c=crc)


def copy_chunk(chunk: EmbeddingChunk) -> EmbeddingChunk:
    """The chunk owning its bytes (``bytes``), independent of the memory it was cut from."""
    return replace(chunk, data=bytes(chunk.data))


def split_chunks(
    data: bytes | bytearray | memoryview, chunk_bytes: int | None = None, checksum: bool = True
) -> Iterator[EmbeddingChunk]:
    """Yield ``data`` as bounded chunks (lazily: each chunk's bytes are copied when yielded)."""
    return map(copy_chunk, chunk_views(data, chunk_bytes, checksum))


class ChunkAssembler:
    """Accumulates chunks of one item into a preallocated buffer, validating as it goes."""

    def __init__(self, total_bytes: int, what: str = "embedding") -> None:
        # NOTE: uninitialized on purpose (bytearray(n) zero-fills 12.5 MiB first, ~0.6 ms): the
        # contiguity checks guarantee every byte is written before ``finish`` hands it out.
        self.buffer = np.empty(total_bytes, dtype=np.uint8)  # [total_bytes] u8
        self.filled = 0
        self._total = total_bytes
        self._what = what

    def add(self, chunk: Any) -> None:
        offset, total = int(chunk.offset), int(chunk.total_bytes)
        data = np.frombuffer(chunk.data, dtype=np.uint8)  # a view, never a copy
        crc32c, crc32 = getattr(chunk, "crc32c", None), getattr(chunk, "crc32", None)
        if total != self._total:
            raise StreamCutError(
                f"{self._what}: stream announces {total} bytes, descriptor says {self._total}"
            )
        if offset != self.filled:
            raise StreamCutError(
                f"{self._what}: chunk at offset {offset}, expected {self.filled} (gap or reorder)"
            )
        end = offset + len(data)
        if end > self._total:
            raise StreamCutError(f"{self._what}: chunk runs past the end ({end} > {self._total})")
        if crc32c is not None:
            bad = google_crc32c.value(data) != crc32c
        else:
            bad = crc32 is not None and zlib.crc32(data) != crc32
        if bad:
            raise StreamCutError(f"{self._what}: checksum mismatch in chunk at offset {offset}")
        self.buffer[offset:end] = data
        self.filled = end

    def finish(self) -> memoryview:
        """The whole item (a writable byte view of the buffer, for ``torch.frombuffer``)."""
        if self.filled != self._total:
            raise StreamCutError(
                f"{self._what}: stream ended after {self.filled} of {self._total} bytes"
            )
        return memoryview(self.buffer)


def _rpc_error(e: grpc.RpcError, assembler: ChunkAssembler) -> Exception:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return e
    what = assembler._what
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DATA_LOSS):
        return StaleSlotError(f"{what}: producer no longer has it ({code.name}: {details})")
    if assembler.filled == 0:
        name = code.name if code is not None else "error"
        return PoolUnavailableError(f"{what}: producer unreachable ({name}: {details})")
    return StreamCutError(
        f"{what}: stream failed after {assembler.filled} of {len(assembler.buffer)} bytes"
        f" ({code.name if code is not None else 'error'}: {details})"
    )


async def assemble(
    chunks: AsyncIterable[Any] | Iterable[Any], total_bytes: int, what: str = "embedding"
) -> memoryview:
    """Read a whole chunk stream into one buffer; raises StreamCutError if anything is off."""
    assembler = ChunkAssembler(total_bytes, what)
    done = False
    try:
        if hasattr(chunks, "__aiter__"):
            async for chunk in chunks:  # type: ignore[union-attr]
                assembler.add(chunk)
        else:
            for chunk in chunks:  # type: ignore[union-attr]
                assembler.add(chunk)
        done = True
    except grpc.RpcError as e:
        raise _rpc_error(e, assembler) from e
    finally:
        # NOTE: a rejected chunk leaves the RPC open; cancel it so the producer stops sending.
        cancel = getattr(chunks, "cancel", None)
        if not done and callable(cancel):
            cancel()
    return assembler.finish()
