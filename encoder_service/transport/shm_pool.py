"""The ``shm`` path: an embedding pool in POSIX shared memory (CPU tensors, same host).

``ShmPool`` (encoder side) creates one segment named by its pool id that holds the control block
and the data region (control_block.py); the name is the only thing it exports, once, inside
every descriptor's embedding id. ``ShmPoolView`` (decoder side) attaches once per pool (the
importer caches it) and copies an item's bytes out into a fresh tensor.

Not here: descriptor validation and staleness checks (importer.py), slot policy (slots.py).
"""

from __future__ import annotations

import numpy as np
import torch

from encoder_service.transport.control_block import ControlBlock


def as_bytes(t: torch.Tensor) -> torch.Tensor:  # [*] any dtype -> [nbytes] uint8
    """A contiguous tensor's storage as a flat byte view (copies only if not contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


class ShmPool:
    """Owner side of an shm pool."""

    kind = "shm"

    def __init__(self, pool_id: str, data_bytes: int, block_bytes: int, meta: dict) -> None:
        self.control = ControlBlock.create(
            pool_id,
            dict(meta, kind=self.kind, block_bytes=block_bytes),
            num_blocks=data_bytes // block_bytes,
            data_bytes=data_bytes,
            with_data=True,
        )
        assert self.control.data is not None
        self._data = np.frombuffer(self.control.data, dtype=np.uint8)  # [data_bytes] u8

    def write(self, offset: int, src: torch.Tensor) -> None:  # src: [n, H] any device
        # NOTE: numpy for host copies: a plain memcpy, steadier than torch's threaded copy
        # when cores are shared with the model's own threads.
        flat = as_bytes(src.detach()).cpu().numpy()
        self._data[offset : offset + flat.size] = flat

    def read(self, offset: int, nbytes: int) -> memoryview:
        """Host bytes of a slot, for streaming (a view: valid while the slot is live)."""
        assert self.control.data is not None
        return self.control.data[offset : offset + nbytes]

    def close(self) -> None:
        self.control.mark_closed()
        self._data = None  # type: ignore[assignment]
        self.control.close()


class ShmPoolView:
    """Importer side of an shm pool; opened once per pool and cached by the importer."""

    kind = "shm"

    def __init__(self, control: ControlBlock) -> None:
        assert control.data is not None
        self.control = control
        self._data = np.frombuffer(control.data, dtype=np.uint8)  # [data_bytes] u8

    def copy_out(self, offset: int, nbytes: int) -> torch.Tensor:  # -> [nbytes] u8 on CPU
        out = torch.empty(nbytes, dtype=torch.uint8)
        out.numpy()[:] = self._data[offset : offset + nbytes]
        return out

    def close(self) -> None:
        self._data = None  # type: ignore[assignment]
        self.control.close()
