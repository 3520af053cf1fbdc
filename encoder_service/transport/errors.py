"""Typed errors of the embedding transport.

Every error carries ``status_name``, the gRPC status code a service returns when the error ends a
request: ``UNAVAILABLE`` when the producer (its pool, its process, its stream) cannot be reached
and a retry elsewhere may succeed, ``DATA_LOSS`` when the bytes are gone or cannot be trusted (a
stale or freed slot, a descriptor pointing outside its pool, a stream cut short or corrupted).
Services map with ``grpc_status(err)``; nothing else here knows about gRPC.

Not here: the conditions that raise them (pools, importer, stream helpers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


class TransportError(Exception):
    """Base class: an embedding could not be moved from its encoder to this process."""

    status_name = "UNAVAILABLE"


class PoolUnavailableError(TransportError):
    """The producer's pool cannot be opened or its owner is gone (closed, crashed, other host)."""

    status_name = "UNAVAILABLE"


class PoolOpenError(PoolUnavailableError):
    """This process cannot map the pool at all (no shared IPC namespace, no CUDA, no library).

    The importer answers this one by falling back to ``grpc_stream``; other errors end the fetch.
    """


class DescriptorError(TransportError):
    """A descriptor is malformed or points outside its pool or slot."""

    status_name = "DATA_LOSS"


class StaleSlotError(TransportError):
    """The slot named by a descriptor was freed or reused (acked, expired, or overwritten)."""

    status_name = "DATA_LOSS"


class StreamCutError(TransportError):
    """A ``grpc_stream`` transfer ended early, skipped bytes, or failed its checksum."""

    status_name = "DATA_LOSS"


def grpc_status(err: TransportError) -> grpc.StatusCode:
    """The gRPC status code a servicer should abort with for ``err``."""
    import grpc

    return grpc.StatusCode[err.status_name]
