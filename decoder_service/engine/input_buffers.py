"""Persistent host/device buffers behind a step's inputs: one host-to-device copy per step.

Contract: ``StagingBuffer.stage(arrays)`` lays numpy arrays (any of int64/int32/uint8) back to
back, 8-byte aligned, into one host buffer (pinned when the device is CUDA), copies the used
prefix to one persistent device buffer with a single ``non_blocking`` copy, and returns a
device tensor view per array (same dtype and shape). The views alias the persistent buffer: they
are valid until the next ``stage`` call, which is all a step needs. On a CPU device no copy is
made (each array is wrapped as is), unless ``always_copy`` asks for the staged path (tests).
``BlockTables`` keeps every running request's block ids in one row of a growing int32 array;
rows are appended to (a request's table only grows while it runs) and handed back on drop, so
a step gathers the batch's tables with one indexing op instead of rebuilding them.
What does not belong here: what the arrays mean (``model_runner.py``), scheduling.
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 8  # bytes; keeps every int64 view aligned
_NP_TO_TORCH = {
    np.dtype(np.int64): torch.int64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.bool_): torch.bool,
}


class StagingBuffer:
    def __init__(self, device: torch.device, always_copy: bool = False) -> None:
        self.device = device
        self.copy = always_copy or device.type != "cpu"
        self._pin = device.type == "cuda"
        self._host = torch.empty(0, dtype=torch.uint8)  # [nbytes] uint8, pinned on CUDA
        self._host_np = self._host.numpy()
        self._dev = torch.empty(0, dtype=torch.uint8, device=device)  # [nbytes] uint8
        self._copied: torch.cuda.Event | None = None  # the last copy out of ``_host``

    def stage(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        if not self.copy:
            return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
        offsets, end = [], 0
        for a in arrays:
            offsets.append(end)
            end += -(-a.nbytes // _ALIGN) * _ALIGN
        self._reserve(end)
        if self._copied is not None:
            # NOTE: the previous step's non_blocking copy may still be reading the pinned
            # buffer; overwrite it only once that copy is done (normally long finished).
            self._copied.synchronize()
        for a, off in zip(arrays, offsets, strict=True):
            self._host_np[off : off + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        self._dev[:end].copy_(self._host[:end], non_blocking=True)
        if self.device.type == "cuda":
            if self._copied is None:
                self._copied = torch.cuda.Event()
            self._copied.record()
        out = []
        for a, off in zip(arrays, offsets, strict=True):
            raw = self._dev[off : off + a.nbytes]
            out.append(raw.view(_NP_TO_TORCH[a.dtype]).view(a.shape))
        return out

    def _reserve(self, nbytes: int) -> None:
        if nbytes <= self._host.numel():
            return
        size = max(nbytes, 2 * self._host.numel(), 4096)
        if self._copied is not None:
            self._copied.synchronize()
        self._host = torch.empty(size, dtype=torch.uint8, pin_memory=self._pin)
        self._host_np = self._host.numpy()
        # NOTE: growing replaces the device buffer; a later CUDA graph must be captured on a
        # buffer already at its final size (reserve the largest step first).
        self._dev = torch.empty(size, dtype=torch.uint8, device=self.device)


class BlockTables:
    """Block ids of the running requests, one row per request, in a growing int32 array."""

    def __init__(self, rows: int = 8, cols: int = 16) -> None:
        self.ids = np.zeros((rows, cols), dtype=np.int32)  # [rows, cols] int32
        self._free_rows = list(range(rows - 1, -1, -1))
        self._lens: dict[int, int] = {}  # row -> block ids written

    def add(self) -> int:
        """A fresh, zeroed row for a request joining the batch."""
        if not self._free_rows:
            old = self.ids.shape[0]
            self.ids = np.concatenate([self.ids, np.zeros_like(self.ids)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        row = self._free_rows.pop()
        self._lens[row] = 0
        return row

    def release(self, row: int) -> None:
        self.ids[row, : self._lens.pop(row)] = 0
        self._free_rows.append(row)

    def sync(self, row: int, block_ids: list[int]) -> None:
        """Write the ids the row lacks; ``block_ids`` is the request's whole, append-only table."""
        have = self._lens[row]
        n = len(block_ids)
        if n <= have:
            return
        if n > self.ids.shape[1]:
            wider = np.zeros((self.ids.shape[0], max(n, 2 * self.ids.shape[1])), np.int32)
            wider[:, : self.ids.shape[1]] = self.ids
            self.ids = wider
        self.ids[row, have:n] = block_ids[have:]
        self._lens[row] = n
