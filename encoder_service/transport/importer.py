"""Decoder side of the embedding transport: turn an ``EmbeddingLocation`` into a tensor.

``EmbeddingImporter.fetch(location, grpc_fetch_fn)`` picks the path itself: the location's
same-host path (``cuda_ipc`` or ``shm``) when the producer's host identity equals ours, else
``grpc_stream`` through ``grpc_fetch_fn(location)``, which must return the ``FetchEmbedding``
response stream (an async or sync iterable of chunk messages). ``force_path="grpc_stream"``
streams everything; ``force_path="shm"``/``"cuda_ipc"`` trusts a same-host descriptor without the
host-identity check (containers that share IPC but not a hostname).

Each producer's pool is opened once and cached. Before copying, a descriptor is checked against
the pool itself: pool open and its owner alive, path and host matching, offset equal to its slot's
start, bytes inside the pool and equal to the slot's recorded length, and the slot's generation
equal to the descriptor's (checked again after the copy). Failures raise a ``TransportError``
(``status_name`` UNAVAILABLE or DATA_LOSS) for this one request; the importer keeps serving others.
A pool that cannot be opened at all (``PoolOpenError``) is remembered and its items are streamed
instead, counted in ``stats.open_fallbacks``.

Fetched features land on the decoder's device (``keep_on_device``) within
``device_budget_bytes`` (``device_budget.py``); past it, and with ``keep_on_device=False``, in
host memory until prefill copies the rows it needs.

The caller acks after ``fetch`` returns (the Ack RPC belongs to the service).

Not here: the Ack RPC, placement of features into the prompt, the encoder side (exporter.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from encoder_service.transport import metrics
from encoder_service.transport.control_block import ControlBlock
from encoder_service.transport.cuda_ipc_pool import CudaIpcPoolView
from encoder_service.transport.descriptor import PATHS, EmbeddingLocation, TransportPath
from encoder_service.transport.device_budget import DeviceBudget
from encoder_service.transport.errors import (
    DescriptorError,
    PoolOpenError,
    PoolUnavailableError,
    StaleSlotError,
    TransportError,
)
from encoder_service.transport.host import HostIdentity, local_host, process_alive
from encoder_service.transport.shm_pool import ShmPoolView
from encoder_service.transport.stream import assemble

log = logging.getLogger(__name__)

GrpcFetchFn = Callable[[EmbeddingLocation], AsyncIterable[Any] | Iterable[Any]]


@dataclass(frozen=True)
class ImporterConfig:
    device: str = "cpu"  # the decoder's device: pools are opened and copied on it
    force_path: TransportPath | None = None  # None = decide by host identity
    keep_on_device: bool = True  # False: move fetched features to host memory until prefill
    # with keep_on_device: features still alive on the device total at most this many bytes;
    # the ones past it wait in host memory (device_budget.py). None: no limit
    device_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.force_path is not None and self.force_path not in PATHS:
            raise ValueError(f"force_path must be one of {PATHS}, not {self.force_path!r}")


class _PoolView(Protocol):
    control: ControlBlock

    def copy_out(self, offset: int, nbytes: int) -> torch.Tensor: ...
    def close(self) -> None: ...


class EmbeddingImporter:
    def __init__(self, config: ImporterConfig = ImporterConfig(), host: HostIdentity | None = None):
        self.config = config
        device = torch.device(config.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.output_device = device if config.keep_on_device else torch.device("cpu")
        limit = config.device_budget_bytes
        on_device = self.output_device.type != "cpu"
        self.budget = DeviceBudget(limit) if on_device and limit is not None else None
        self.host = host or local_host()
        self.stats = metrics.TransportStats()
        self._lock = threading.Lock()
        self._views: dict[str, _PoolView] = {}
        self._unopenable: dict[str, str] = {}  # pool id -> why it could not be opened
        self.stats.gauges[metrics.POOLS_OPEN] = lambda: len(self._views)
        if self.budget is not None:
            self.stats.gauges[metrics.DEVICE_HELD_BYTES] = lambda: self.budget.held

    def choose_path(self, location: EmbeddingLocation) -> TransportPath:
        force = self.config.force_path
        if force == "grpc_stream" or location.path == "grpc_stream":
            return "grpc_stream"
        if force is not None or location.host == self.host:
            return location.path
        return "grpc_stream"

    async def fetch(
        self, location: EmbeddingLocation, grpc_fetch_fn: GrpcFetchFn | None = None
    ) -> torch.Tensor:  # -> [num_tokens, hidden] on output_device
        """The embedding described by ``location``; raises TransportError on any fault."""
        try:
            path = self.choose_path(location)
            if path != "grpc_stream":
                try:
                    return self.fetch_local(location)
                except PoolOpenError:
                    self.stats.open_fallbacks += 1
            if grpc_fetch_fn is None:
                raise PoolUnavailableError(
                    f"embedding {location.embedding_id} needs grpc_stream, but no stream is set up"
                )
            what = f"embedding {location.embedding_id}"
            buf = await assemble(grpc_fetch_fn(location), location.nbytes, what)
            out = self._place(_from_bytes(buf, location))
            self.stats.fetches["grpc_stream"] += 1
            self.stats.fetch_bytes["grpc_stream"] += location.nbytes
            return out
        except TransportError as e:
            self.stats.errors[type(e).__name__] += 1
            raise

    def fetch_local(self, location: EmbeddingLocation) -> torch.Tensor:  # -> [T, H]
        """Copy a same-host item out of its producer's pool (synchronous)."""
        view = self._view(location.key.pool_id, location.path)
        raw = self._checked_copy(view, location)
        out = self._place(raw.view(location.torch_dtype).reshape(location.shape))
        self.stats.fetches[location.path] += 1
        self.stats.fetch_bytes[location.path] += location.nbytes
        return out

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        if self.budget is None:
            return t.to(self.output_device)
        return self.budget.place(t, self.output_device)

    # -- pools ---------------------------------------------------------------------------

    def _view(self, pool_id: str, path: TransportPath) -> _PoolView:
        with self._lock:
            view = self._views.get(pool_id)
            if view is not None:
                return view
            if pool_id in self._unopenable:
                raise PoolOpenError(self._unopenable[pool_id])
            try:
                view = self._open(pool_id, path)
            except PoolOpenError as e:
                log.warning("pool %s cannot be opened here, streaming its items: %s", pool_id, e)
                self._unopenable[pool_id] = str(e)
                raise
            self._views[pool_id] = view
            return view

    def _open(self, pool_id: str, path: TransportPath) -> _PoolView:
        control = ControlBlock.attach(pool_id)
        kind = control.meta.get("kind")
        try:
            if kind != path:
                raise DescriptorError(f"pool {pool_id!r} is a {kind} pool, descriptor says {path}")
            if kind == "shm":
                return ShmPoolView(control)
            return CudaIpcPoolView(control, self.device)
        except TransportError:
            control.close()
            raise

    def _evict(self, pool_id: str) -> None:
        with self._lock:
            view = self._views.pop(pool_id, None)
        if view is not None:
            view.close()

    def _checked_copy(self, view: _PoolView, loc: EmbeddingLocation) -> torch.Tensor:
        ctl = view.control
        name = loc.embedding_id
        if ctl.closed:
            self._evict(loc.key.pool_id)
            raise PoolUnavailableError(f"embedding {name}: its encoder shut its pool down")
        alive = process_alive(int(ctl.meta["owner_pid"]), str(ctl.meta["pid_ns"]))
        if alive is False:
            self._evict(loc.key.pool_id)
            raise PoolUnavailableError(f"embedding {name}: its encoder process is gone")
        if ctl.meta.get("host_id") != loc.host.key:
            raise DescriptorError(f"embedding {name}: host does not match its pool's owner")
        slot = loc.key.slot_id
        if not 0 <= slot < ctl.num_blocks or loc.offset != slot * ctl.block_bytes:
            raise DescriptorError(f"embedding {name}: offset {loc.offset} is not a slot start")
        if loc.offset + loc.nbytes > ctl.data_bytes:
            raise DescriptorError(
                f"embedding {name}: bytes [{loc.offset}, {loc.offset + loc.nbytes}) lie outside"
                f" the {ctl.data_bytes}-byte pool"
            )
        if int(ctl.generations[slot]) != loc.key.generation:
            raise StaleSlotError(f"embedding {name}: slot was released, expired or reused")
        if int(ctl.lengths[slot]) != loc.nbytes:
            raise DescriptorError(
                f"embedding {name}: {loc.nbytes} bytes asked, slot holds {int(ctl.lengths[slot])}"
            )
        raw = view.copy_out(loc.offset, loc.nbytes)
        # NOTE: seqlock-style recheck: the producer zeroes the generation before a freed slot can
        # be rewritten, so an unchanged generation after the copy means the bytes are this item's.
        if int(ctl.generations[slot]) != loc.key.generation:
            raise StaleSlotError(f"embedding {name}: slot was reused while it was being read")
        return raw

    def close(self) -> None:
        with self._lock:
            views, self._views = list(self._views.values()), {}
        for view in views:
            view.close()

    def __enter__(self) -> EmbeddingImporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _from_bytes(buf: memoryview, loc: EmbeddingLocation) -> torch.Tensor:  # -> [T, H] on CPU
    if loc.nbytes == 0:
        return torch.empty(loc.shape, dtype=loc.torch_dtype)
    return torch.frombuffer(buf, dtype=torch.uint8).view(loc.torch_dtype).reshape(loc.shape)
