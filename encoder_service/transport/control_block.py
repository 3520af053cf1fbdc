"""The POSIX shared-memory control block every same-host pool publishes under its pool id.

Layout of the segment named ``pool_id`` (all integers little endian):

    [0, 8)              magic b"GLMPOOL1"
    [8, 12)             u32 length of the JSON meta that follows (kind, sizes, owner, IPC handle)
    [12, META_BYTES)    JSON meta
    [META_BYTES, +8)    i64 state: 1 open, 2 closed (the owner shut down; every slot is dead)
    [TABLES, +8n)       i64 generations[num_blocks]  (slot id -> live generation, 0 = free)
    [TABLES+8n, +8n)    i64 lengths[num_blocks]      (slot id -> nbytes of the live item)
    [DATA, +data_bytes) the data region (shm pools only; a CUDA pool keeps its data on the GPU)

The owner creates it once; importers attach once per pool (cached by the importer) and read the
meta and the two tables to validate every descriptor before and after copying.

Not here: slot policy (slots.py), tensor copies (shm_pool.py, cuda_ipc_pool.py).
"""

from __future__ import annotations

import json
import struct
import sys
import threading
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from encoder_service.transport.errors import PoolOpenError, PoolUnavailableError

MAGIC = b"GLMPOOL1"
META_BYTES = 4096
_STATE_OFFSET = META_BYTES
_TABLES_OFFSET = META_BYTES + 64
_PAGE = 4096
STATE_OPEN = 1
STATE_CLOSED = 2

_attach_lock = threading.Lock()


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _attach_untracked(name: str) -> SharedMemory:
    """Open an existing segment without letting this process's resource tracker own it.

    NOTE: before Python 3.13 attaching registers the segment with the resource tracker, which
    unlinks it when this process exits: an importer would destroy the producer's pool. 3.13 has
    ``track=False``; before that, registration is suppressed for the duration of the attach.
    """
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)
    with _attach_lock:
        original = resource_tracker.register
        resource_tracker.register = lambda *args, **kwargs: None
        try:
            return SharedMemory(name=name)
        finally:
            resource_tracker.register = original


class ControlBlock:
    """A mapped control segment: meta, state flag, slot tables and (shm pools) the data region."""

    def __init__(self, shm: SharedMemory, meta: dict[str, Any], owner: bool) -> None:
        self._shm = shm
        self.meta = meta
        self.owner = owner
        self.name = meta["pool_id"]
        n = int(meta["num_blocks"])
        self.num_blocks = n
        self.data_bytes = int(meta["data_bytes"])
        self.block_bytes = int(meta["block_bytes"])
        buf = shm.buf
        self._state = np.ndarray((1,), dtype="<i8", buffer=buf, offset=_STATE_OFFSET)
        self.generations = np.ndarray((n,), dtype="<i8", buffer=buf, offset=_TABLES_OFFSET)
        self.lengths = np.ndarray((n,), dtype="<i8", buffer=buf, offset=_TABLES_OFFSET + 8 * n)
        self._data_offset = int(meta["data_offset"])
        self.data: memoryview | None = None
        if meta["kind"] == "shm":
            self.data = buf[self._data_offset : self._data_offset + self.data_bytes]

    @classmethod
    def create(
        cls, pool_id: str, meta: dict[str, Any], num_blocks: int, data_bytes: int, with_data: bool
    ) -> ControlBlock:
        tables_end = _TABLES_OFFSET + 16 * num_blocks
        data_offset = _round_up(tables_end, _PAGE)
        meta = dict(
            meta,
            pool_id=pool_id,
            num_blocks=num_blocks,
            data_bytes=data_bytes,
            data_offset=data_offset,
        )
        blob = json.dumps(meta, sort_keys=True).encode()
        if 12 + len(blob) > META_BYTES:
            raise ValueError(f"pool meta of {len(blob)} bytes does not fit the header")
        size = data_offset + (data_bytes if with_data else 0)
        shm = SharedMemory(name=pool_id, create=True, size=size)
        shm.buf[0:8] = MAGIC
        shm.buf[8:12] = struct.pack("<I", len(blob))
        shm.buf[12 : 12 + len(blob)] = blob
        block = cls(shm, meta, owner=True)
        block.generations[:] = 0
        block.lengths[:] = 0
        block._state[0] = STATE_OPEN
        return block

    @classmethod
    def attach(cls, pool_id: str) -> ControlBlock:
        try:
            shm = _attach_untracked(pool_id)
        except (FileNotFoundError, PermissionError, OSError) as e:
            raise PoolOpenError(f"cannot open pool {pool_id!r}: {e}") from None
        buf = shm.buf
        if len(buf) < _TABLES_OFFSET or bytes(buf[0:8]) != MAGIC:
            shm.close()
            raise PoolOpenError(f"segment {pool_id!r} is not an embedding pool")
        (length,) = struct.unpack("<I", bytes(buf[8:12]))
        try:
            meta = json.loads(bytes(buf[12 : 12 + length]))
        except ValueError:
            shm.close()
            raise PoolOpenError(f"pool {pool_id!r} has an unreadable header") from None
        n = int(meta["num_blocks"])
        expected = int(meta["data_offset"]) + (
            int(meta["data_bytes"]) if meta["kind"] == "shm" else 0
        )
        if len(buf) < max(expected, _TABLES_OFFSET + 16 * n):
            shm.close()
            raise PoolOpenError(f"pool {pool_id!r} is smaller than its header says")
        return cls(shm, meta, owner=False)

    @property
    def closed(self) -> bool:
        return int(self._state[0]) != STATE_OPEN

    def mark_closed(self) -> None:
        self._state[0] = STATE_CLOSED

    def check_open(self) -> None:
        if self.closed:
            raise PoolUnavailableError(f"pool {self.name!r} was closed by its owner")

    def close(self) -> None:
        """Unmap (and, for the owner, unlink). Safe to call twice."""
        if self._shm is None:
            return
        shm, self._shm = self._shm, None
        # Views into the mapping must go before the mapping can close.
        self.data = None
        self._state = self.generations = self.lengths = None  # type: ignore[assignment]
        try:
            shm.close()
        except BufferError:
            # NOTE: a tensor built on the mapping is still alive somewhere; the mapping then
            # lives until that tensor dies. The name is still unlinked below.
            pass
        if self.owner:
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
