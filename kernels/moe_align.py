"""Routed slots sorted by expert and padded to row blocks: the fused expert kernels' layout.

Contract: ``align_slots(ids [T, K] int64 global expert ids, E_local, expert_start,
foreign_slots, edges, block_m) -> AlignedSlots``: the ``T*K`` flat slots ``t*K + k`` sorted by
local expert (stable: token order within an expert), each expert's group padded to a multiple of
``block_m`` with the sentinel ``T*K``, in a static ``max_padded_rows(T*K, E_local, block_m)``
buffer; ``block_expert`` names each row block's expert (``E_local`` past the groups) and
``num_padded`` (a device scalar) how many rows are in use. Slots of experts outside
``[expert_start, expert_start + E_local)`` (other ranks' under expert parallelism) are dropped.
Nothing is read on the host, so both versions can be captured in a CUDA graph.

``align_slots`` is torch ops (the reference, the path without Triton, and the path for
prefill-sized batches). ``align_slots_triton`` is one single-program Triton launch for decode
sizes (``T*K`` up to a few thousand): a counting sort in registers, per-expert counts
(``tl.histogram``), their padded exclusive prefix sum (``tl.cumsum``), then chunk by chunk in
slot order each slot's rank among the earlier slots of its expert (a chunk-square comparison plus
the running per-expert counts of the chunks before), scattered to its row. Integer counts only
and no atomics (a row has one writer; a block's slots all write the same expert id): the result
is ``align_slots``'s bit for bit. One program by design, so prefill-sized batches, where its
serial chunks would be slow, keep the torch version.

What does not belong here: the expert GEMMs (``fused_moe.py``), routing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

try:  # optional: a CPU-only install may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

BLOCK_M = 16  # the default rows per block (the fused kernels' decode blocks)


class AlignedSlots(NamedTuple):
    sorted_slot_ids: torch.Tensor  # [max_padded] int64 slot t*K+k by local expert; T*K pads
    block_expert: torch.Tensor  # [max_padded // BLOCK_M] int32 local expert; E_local if unused
    num_padded: torch.Tensor  # [1] int64 rows in use: sum of the padded group sizes


def max_padded_rows(num_slots: int, num_experts: int, block_m: int = BLOCK_M) -> int:
    """Static bound on the aligned rows: at most min(E, slots) groups each add < block_m pads."""
    rows = num_slots + min(num_experts, num_slots) * (block_m - 1)
    return -(-rows // block_m) * block_m


def align_slots(
    ids: torch.Tensor,  # [T, K] int64 global expert ids
    num_experts: int,  # E_local
    expert_start: int = 0,
    foreign_slots: bool = True,  # False only when every id is a local expert
    edges: torch.Tensor | None = None,  # [E_local + 1] int64 0..E_local, reused across calls
    block_m: int = BLOCK_M,  # rows per block, a power of two
) -> AlignedSlots:
    num_slots, e = ids.numel(), num_experts
    rows = max_padded_rows(num_slots, e, block_m)
    local = ids.reshape(-1)  # [S]
    if expert_start:
        local = local - expert_start
    if foreign_slots:
        # -1 and E both become E under the modulo: other ranks' experts sort after every group
        local = local.clamp(-1, e).remainder_(e + 1)
    # stable: within an expert the slots keep token order, as the reference adds them
    keys, order = local.sort(stable=True)  # [S], [S]
    if edges is None:
        edges = torch.arange(e + 1, device=ids.device)
    starts = torch.searchsorted(keys, edges)  # [E+1] first sorted row of each expert; [E]: end
    # round each group up to a multiple of block_m (a power of two)
    padded = (starts[1:] - starts[:-1] + (block_m - 1)).bitwise_and_(-block_m)  # [E]
    padded_starts = torch.nn.functional.pad(padded, (1, 0)).cumsum_(0)  # [E+1]; [E]: rows used
    # sorted row p of expert e lands at padded_starts[e] + (p - starts[e]); foreign slots (key E)
    # land in [num_padded, num_padded + foreign) < rows, distinct, and are written as sentinels
    dest = torch.arange(num_slots, device=ids.device) + (padded_starts - starts)[keys]
    if foreign_slots:
        order = torch.where(keys < e, order, num_slots)
    slot_ids = torch.full((rows,), num_slots, dtype=torch.int64, device=ids.device)
    slot_ids.scatter_(0, dest, order)
    block_rows = torch.arange(0, rows, block_m, device=ids.device)
    # a block's expert = how many padded groups end at or before its first row (E: past them all)
    block_expert = torch.searchsorted(padded_starts[1:], block_rows, right=True, out_int32=True)
    return AlignedSlots(slot_ids, block_expert, padded_starts[e:])


ALIGN_ROW_CHUNK = 1024  # rows per step of the kernel's sentinel fill


def align_slots_triton(
    ids: torch.Tensor,  # [T, K] int64 global expert ids
    num_experts: int,  # E_local
    expert_start: int = 0,
    block_m: int = BLOCK_M,  # rows per block, a power of two
) -> AlignedSlots:
    """``align_slots`` in one Triton launch of one program, for ``T*K <= MAX_SLOTS``: the same
    three outputs, bit for bit. Ids outside ``[expert_start, expert_start + E_local)`` are always
    dropped (the torch version's ``foreign_slots=True``; with only local ids the two agree)."""
    num_slots = ids.numel()
    rows = max_padded_rows(num_slots, num_experts, block_m)
    slot_ids = torch.empty(rows, dtype=torch.int64, device=ids.device)  # [max_padded]
    block_expert = torch.empty(rows // block_m, dtype=torch.int32, device=ids.device)
    num_padded = torch.empty(1, dtype=torch.int64, device=ids.device)
    width = max(32, triton.next_power_of_2(num_slots))
    rank_chunk = min(128, width)
    # NOTE: one program by design: the counts must be complete before any slot is placed, and a
    # second program could only learn them through atomics or a grid-wide barrier. One slot of a
    # rank chunk per thread (1 to 4 warps): a decode batch runs on one warp, and no histogram
    # input is replicated across threads (the lowering divides such counts back, but need not).
    _align_kernel[(1,)](
        ids.reshape(-1), slot_ids, block_expert, num_padded,
        num_slots, num_experts, expert_start, rows,
        BLOCK_M=block_m, EXPERTS=max(32, triton.next_power_of_2(num_experts)),
        COUNT_CHUNK=min(1024, width), RANK_CHUNK=rank_chunk, ROW_CHUNK=ALIGN_ROW_CHUNK,
        num_warps=rank_chunk // 32,
    )  # fmt: skip
    return AlignedSlots(slot_ids, block_expert, num_padded)


if triton is not None:

    @triton.jit
    def _local_experts(ids_ptr, slots, num_slots, num_experts, expert_start):
        # (local expert, is local): other ranks' slots and lanes past the end read as expert 0
        # with is-local off, so every histogram bin and gather index stays in range
        ids = tl.load(ids_ptr + slots, mask=slots < num_slots, other=-1)
        local = ids - expert_start
        owned = (slots < num_slots) & (local >= 0) & (local < num_experts)
        return tl.where(owned, local, 0).to(tl.int32), owned

    @triton.jit
    def _align_kernel(
        ids_ptr, slot_ptr, block_expert_ptr, num_padded_ptr,
        num_slots, num_experts, expert_start, rows,
        BLOCK_M: tl.constexpr, EXPERTS: tl.constexpr, COUNT_CHUNK: tl.constexpr,
        RANK_CHUNK: tl.constexpr, ROW_CHUNK: tl.constexpr,
    ):  # fmt: skip
        # 1. slots per local expert; bins past E_local stay empty
        counts = tl.zeros((EXPERTS,), dtype=tl.int32)
        for first in range(0, num_slots, COUNT_CHUNK):
            expert, owned = _local_experts(
                ids_ptr, first + tl.arange(0, COUNT_CHUNK), num_slots, num_experts, expert_start
            )
            counts += tl.histogram(expert, EXPERTS, mask=owned)
        # 2. each group rounded up to whole blocks; starts: its first row (exclusive prefix sum)
        padded = (counts + (BLOCK_M - 1)) // BLOCK_M * BLOCK_M  # [EXPERTS]
        starts = tl.cumsum(padded, 0) - padded
        used = tl.sum(padded, 0)
        tl.store(num_padded_ptr, used.to(tl.int64))
        # 3. sentinels: each group's < BLOCK_M pad rows, then every row past the groups. Real
        # slots take the other rows, so no row has two writers and no barrier orders them.
        pads = padded - counts  # [EXPERTS] < BLOCK_M
        for pad in range(0, BLOCK_M - 1):  # one [EXPERTS] vector at a time: few registers
            rows_at = slot_ptr + starts + counts + pad
            tl.store(rows_at, tl.zeros((EXPERTS,), tl.int64) + num_slots, pad < pads)
        for first in range(0, rows, ROW_CHUNK):
            row = first + tl.arange(0, ROW_CHUNK)
            tail = (row >= used) & (row < rows)
            tl.store(slot_ptr + row, tl.zeros((ROW_CHUNK,), tl.int64) + num_slots, tail)  # sentinel
            # a block past the groups names E_local, written once from its first row
            unused = tl.zeros((ROW_CHUNK,), tl.int32) + num_experts
            tl.store(block_expert_ptr + row // BLOCK_M, unused, tail & (row % BLOCK_M == 0))
        # 4. in slot order, chunk by chunk: a slot's row is its group's start plus the earlier
        # slots of its expert (those of earlier chunks are already in starts), so each group
        # keeps token order. Every block of a group holds at least one real slot, so the real
        # slots also write every used block's expert (all of one block's writers agree).
        lane = tl.arange(0, RANK_CHUNK)
        before = lane[None, :] < lane[:, None]  # [RANK_CHUNK, RANK_CHUNK]: column j precedes row i
        for first in range(0, num_slots, RANK_CHUNK):
            slots = first + lane
            expert, owned = _local_experts(ids_ptr, slots, num_slots, num_experts, expert_start)
            same = (expert[:, None] == expert[None, :]) & owned[None, :] & before
            row = tl.gather(starts, expert, 0) + tl.sum(same.to(tl.int32), 1)  # [RANK_CHUNK]
            tl.store(slot_ptr + row, slots.to(tl.int64), owned)
            tl.store(block_expert_ptr + row // BLOCK_M, expert, owned)
            starts += tl.histogram(expert, EXPERTS, mask=owned)
