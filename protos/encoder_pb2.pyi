from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    MODALITY_IMAGE: _ClassVar[Modality]
    MODALITY_VIDEO: _ClassVar[Modality]

class Transport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRANSPORT_UNSPECIFIED: _ClassVar[Transport]
    TRANSPORT_GRPC_STREAM: _ClassVar[Transport]
    TRANSPORT_SHM: _ClassVar[Transport]
    TRANSPORT_CUDA_IPC: _ClassVar[Transport]
MODALITY_UNSPECIFIED: Modality
MODALITY_IMAGE: Modality
MODALITY_VIDEO: Modality
TRANSPORT_UNSPECIFIED: Transport
TRANSPORT_GRPC_STREAM: Transport
TRANSPORT_SHM: Transport
TRANSPORT_CUDA_IPC: Transport

class MediaOptions(_message.Message):
    __slots__ = ("min_pixels", "max_pixels", "fps", "max_frames")
    MIN_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_FIELD_NUMBER: _ClassVar[int]
    min_pixels: int
    max_pixels: int
    fps: float
    max_frames: int
    def __init__(self, min_pixels: _Optional[int] = ..., max_pixels: _Optional[int] = ..., fps: _Optional[float] = ..., max_frames: _Optional[int] = ...) -> None: ...

class MediaItem(_message.Message):
    __slots__ = ("data", "url", "modality", "options")
    DATA_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    url: str
    modality: Modality
    options: MediaOptions
    def __init__(self, data: _Optional[bytes] = ..., url: _Optional[str] = ..., modality: _Optional[_Union[Modality, str]] = ..., options: _Optional[_Union[MediaOptions, _Mapping]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("items", "num_consumers", "consumer_host_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NUM_CONSUMERS_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_HOST_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[MediaItem]
    num_consumers: int
    consumer_host_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[MediaItem, _Mapping]]] = ..., num_consumers: _Optional[int] = ..., consumer_host_id: _Optional[str] = ...) -> None: ...

class GridTHW(_message.Message):
    __slots__ = ("t", "h", "w")
    T_FIELD_NUMBER: _ClassVar[int]
    H_FIELD_NUMBER: _ClassVar[int]
    W_FIELD_NUMBER: _ClassVar[int]
    t: int
    h: int
    w: int
    def __init__(self, t: _Optional[int] = ..., h: _Optional[int] = ..., w: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("dtype", "shape", "nbytes")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class EmbeddingLocation(_message.Message):
    __slots__ = ("embedding_id", "transport", "ttl_s", "host_id", "pool_id", "offset", "generation")
    EMBEDDING_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    embedding_id: str
    transport: Transport
    ttl_s: float
    host_id: str
    pool_id: str
    offset: int
    generation: int
    def __init__(self, embedding_id: _Optional[str] = ..., transport: _Optional[_Union[Transport, str]] = ..., ttl_s: _Optional[float] = ..., host_id: _Optional[str] = ..., pool_id: _Optional[str] = ..., offset: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class EmbeddingDescriptor(_message.Message):
    __slots__ = ("content_hash", "num_tokens", "grid_thw", "timestamps", "modality", "cache_hit", "tensor", "location")
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GRID_THW_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    content_hash: str
    num_tokens: int
    grid_thw: GridTHW
    timestamps: _containers.RepeatedScalarFieldContainer[float]
    modality: Modality
    cache_hit: bool
    tensor: TensorSpec
    location: EmbeddingLocation
    def __init__(self, content_hash: _Optional[str] = ..., num_tokens: _Optional[int] = ..., grid_thw: _Optional[_Union[GridTHW, _Mapping]] = ..., timestamps: _Optional[_Iterable[float]] = ..., modality: _Optional[_Union[Modality, str]] = ..., cache_hit: _Optional[bool] = ..., tensor: _Optional[_Union[TensorSpec, _Mapping]] = ..., location: _Optional[_Union[EmbeddingLocation, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EmbeddingDescriptor]
    def __init__(self, items: _Optional[_Iterable[_Union[EmbeddingDescriptor, _Mapping]]] = ...) -> None: ...

class FetchEmbeddingRequest(_message.Message):
    __slots__ = ("embedding_id", "chunk_bytes")
    EMBEDDING_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    embedding_id: str
    chunk_bytes: int
    def __init__(self, embedding_id: _Optional[str] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class EmbeddingChunk(_message.Message):
    __slots__ = ("offset", "data", "total_bytes", "crc32", "crc32c")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_bytes: int
    crc32: int
    crc32c: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., crc32: _Optional[int] = ..., crc32c: _Optional[int] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("embedding_ids", "consumer")
    EMBEDDING_IDS_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    embedding_ids: _containers.RepeatedScalarFieldContainer[str]
    consumer: str
    def __init__(self, embedding_ids: _Optional[_Iterable[str]] = ..., consumer: _Optional[str] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ("acknowledged", "released")
    ACKNOWLEDGED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    acknowledged: int
    released: int
    def __init__(self, acknowledged: _Optional[int] = ..., released: _Optional[int] = ...) -> None: ...
