"""Embedding transport shared by the encoder and the decoder services.

Encoder: ``EmbeddingExporter.put`` -> ``EmbeddingLocation`` (-> ``to_dict`` -> proto),
``stream_chunks`` for ``FetchEmbedding``, ``ack`` for ``Ack``, ``sweep_expired`` on a timer.
Decoder: ``EmbeddingLocation.from_dict`` (<- proto) -> ``EmbeddingImporter.fetch`` -> tensor, then
the service acks. Paths: ``cuda_ipc`` and ``shm`` on one host, ``grpc_stream`` anywhere.

Not here: gRPC servicers, proto conversion, scheduling.
"""

from __future__ import annotations

from encoder_service.transport.descriptor import (
    PATHS,
    EmbeddingKey,
    EmbeddingLocation,
    TransportPath,
)
from encoder_service.transport.errors import (
    DescriptorError,
    PoolOpenError,
    PoolUnavailableError,
    StaleSlotError,
    StreamCutError,
    TransportError,
    grpc_status,
)
from encoder_service.transport.exporter import EmbeddingExporter, ExporterConfig
from encoder_service.transport.host import HostIdentity, local_host
from encoder_service.transport.importer import EmbeddingImporter, ImporterConfig
from encoder_service.transport.metrics import TransportCollector, TransportStats
from encoder_service.transport.slots import AckOutcome
from encoder_service.transport.stream import (
    EmbeddingChunk,
    assemble,
    clamp_chunk_bytes,
    grpc_message_options,
    split_chunks,
)

__all__ = [
    "PATHS",
    "AckOutcome",
    "DescriptorError",
    "EmbeddingChunk",
    "EmbeddingExporter",
    "EmbeddingImporter",
    "EmbeddingKey",
    "EmbeddingLocation",
    "ExporterConfig",
    "HostIdentity",
    "ImporterConfig",
    "PoolOpenError",
    "PoolUnavailableError",
    "StaleSlotError",
    "StreamCutError",
    "TransportCollector",
    "TransportError",
    "TransportPath",
    "TransportStats",
    "assemble",
    "clamp_chunk_bytes",
    "grpc_message_options",
    "grpc_status",
    "local_host",
    "split_chunks",
]
