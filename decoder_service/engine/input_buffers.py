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
``DecodeBuffers`` holds the fixed-address inputs the captured decode graphs read (ids, positions,
slots, context lengths, block tables, logits rows for up to ``max_seqs`` sequences) with one
host mirror (pinned on CUDA): ``load`` writes a decode batch padded to a captured size (padding
reads and writes only the scratch block) and moves it with one copy.
What does not belong here: what the arrays mean (``model_runner.py``), scheduling, capture.
"""

from __future__ import annotations

from typing import NamedTuple

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

    def sync(self, row: int, block_ids: list[int]) -> int:
        """Write the ids the row lacks; ``block_ids`` is the request's whole, append-only table.
        Returns its length."""
        have = self._lens[row]
        n = len(block_ids)
        if n <= have:
            return n
        if n > self.ids.shape[1]:
            wider = np.zeros((self.ids.shape[0], max(n, 2 * self.ids.shape[1])), np.int32)
            wider[:, : self.ids.shape[1]] = self.ids
            self.ids = wider
        self.ids[row, have:n] = block_ids[have:]
        self._lens[row] = n
        return n


class DecodeViews(NamedTuple):
    """Views of one buffer set (host mirror or device); a graph of size b reads the first b."""

    ids: torch.Tensor  # [M] int64
    positions: torch.Tensor  # [3 * M] int64; the first 3 * b entries are the [3, b] positions
    slots: torch.Tensor  # [M] int64
    logits_rows: torch.Tensor  # [M] int64
    seq_lens: torch.Tensor  # [M] int32
    tables: torch.Tensor  # [M, max_blocks] int32, last: a step copies only its first rows


def _views(raw: torch.Tensor, m: int, cols: int) -> DecodeViews:  # raw: [nbytes] uint8
    parts, off = [], 0
    for dtype, n in [(torch.int64, m), (torch.int64, 3 * m), (torch.int64, m), (torch.int64, m)]:
        parts.append(raw[off : off + 8 * n].view(dtype))
        off += 8 * n
    parts.append(raw[off : off + 4 * m].view(torch.int32))
    off += -(-4 * m // _ALIGN) * _ALIGN
    parts.append(raw[off : off + 4 * m * cols].view(torch.int32).view(m, cols))
    return DecodeViews(*parts)


def _decode_nbytes(m: int, cols: int) -> tuple[int, int]:  # (total, offset of the tables)
    tables_at = 8 * 6 * m + -(-4 * m // _ALIGN) * _ALIGN
    return tables_at + 4 * m * cols, tables_at


class DecodeBuffers:
    """Fixed-address decode inputs for up to ``max_seqs`` sequences (see the module contract)."""

    def __init__(
        self, max_seqs: int, max_blocks: int, pad_slot: int, pad_block: int, device: torch.device
    ) -> None:
        self.max_seqs, self.max_blocks = max_seqs, max_blocks
        self.pad_slot, self.pad_block = pad_slot, pad_block  # the scratch slot and its block
        nbytes, self._tables_at = _decode_nbytes(max_seqs, max_blocks)
        self._host_raw = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self._dev_raw = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._np = DecodeViews(*(t.numpy() for t in _views(self._host_raw, max_seqs, max_blocks)))
        self.dev = _views(self._dev_raw, max_seqs, max_blocks)
        self._copied: torch.cuda.Event | None = None
        # every padding row reads one key of the scratch block from the start (capture included)
        none = np.zeros(0, np.int64)
        self.load(max_seqs, none, none.reshape(3, 0), none, none, none.astype(np.int32),
                  np.zeros((0, 1), np.int32))  # fmt: skip

    def load(
        self,
        size: int,  # the captured batch size the step is padded to
        ids: np.ndarray,  # [b] int64
        positions: np.ndarray,  # [3, b] int64
        slots: np.ndarray,  # [b] int64
        logits_rows: np.ndarray,  # [S] int64
        seq_lens: np.ndarray,  # [b] int32
        tables: np.ndarray,  # [b, n] int32, n <= max_blocks
    ) -> None:
        b, n = tables.shape
        if self._copied is not None:
            self._copied.synchronize()  # NOTE: the last copy may still read the host mirror
        h = self._np
        h.ids[:b], h.ids[b:size] = ids, 0
        pos = h.positions[: 3 * size].reshape(3, size)
        pos[:, :b], pos[:, b:] = positions, 0
        h.slots[:b], h.slots[b:size] = slots, self.pad_slot
        h.logits_rows[: len(logits_rows)] = logits_rows
        h.seq_lens[:b], h.seq_lens[b:size] = seq_lens, 1
        h.tables[:b, :n], h.tables[b:size, 0] = tables, self.pad_block
        # entries past a row's context are stale from earlier steps; the kernel never reads them
        end = self._tables_at + size * self.max_blocks * 4
        self._dev_raw[:end].copy_(self._host_raw[:end], non_blocking=True)
        if self._dev_raw.is_cuda:
            if self._copied is None:
                self._copied = torch.cuda.Event()
            self._copied.record()

    def batch(self, size: int) -> DecodeViews:
        """The device views a graph of ``size`` sequences reads (positions as [3, size])."""
        d = self.dev
        positions = d.positions[: 3 * size].view(3, size)
        return DecodeViews(
            d.ids[:size], positions, d.slots[:size], d.logits_rows, d.seq_lens[:size],
            d.tables[:size],
        )  # fmt: skip
