"""Paged decode attention for grouped-query heads, split along the context (split-K).

Contract: ``paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, max_seqlen_k,
scale)`` returns ``[B, Hq, D]`` in ``q.dtype``: for each sequence ``b`` its one query token
attends (no mask beyond the context) to the ``seq_lens[b]`` keys stored, in order, in the cache
blocks ``block_tables[b, 0..]``. Query head ``h`` reads KV head ``h // (Hq // Hk)``.
``k_cache`` / ``v_cache`` are one layer's halves of the paged cache: ``[num_blocks, block_size,
Hk, D]`` with a contiguous last dim (``kv_cache[0]`` / ``kv_cache[1]`` of the layer). Table entries
past a sequence's last block are never read.

Kernel: one program per (sequence, KV head, context split) computes all the query heads of that
KV head (so a key is read once for its whole group) with an online softmax in float32; a second
kernel merges the splits with their log-sum-exp weights. A program walks its split one tile of
``max(64, block_size)`` tokens at a time: one vector load gathers the block id of every token of
the tile (position ``n`` sits in page ``n // block_size`` at slot ``n % block_size``), then one
``[groups, D] x [D, tile]`` dot. Keys past the context or past the split's last page are masked,
so a tile may straddle either end. (One page per iteration left each program waiting on a table
load and then a 4 KB load: latency bound.)

Splits: split ``s`` of a sequence covers its pages ``[s * p, (s + 1) * p)`` with ``p =
max(ceil(pages / splits), partition / block_size)``: a sequence spreads its pages evenly over the
splits, but no split takes fewer than ``partition`` tokens (default ``max(PARTITION, block_size)``
= 64 at block size 16, one tile), so a short context leaves the later splits empty; an empty
split stores ``m = -inf, l = 0`` and the merge skips it. The split count is fixed per engine with
``splits_for_context(max_model_len)`` = ``min(MAX_SPLITS, ceil(max_model_len / PARTITION))``, so
every step launches the same grid (a CUDA graph is captured once for every context length) and a
sequence's result depends only on its own length, never on the batch around it. With 8 KV heads
and 32 splits, batch 1 at 540 tokens keeps 9 splits x 8 = 72 programs busy (one tile each) and at
8192 tokens 256 programs (4 tiles each). Without ``num_splits`` the count comes from
``max_seqlen_k`` the same way (the grid then follows the batch's longest context). The launch
reads no device value on the host (capturable). ``paged_decode_reference`` is the torch
reference (gather, float32 softmax). Needs Triton; on CPU it runs only under
``TRITON_INTERPRET=1`` (what the tests use).

What does not belong here: writing the cache, the choice of backend (the attention layer's).
"""

from __future__ import annotations

import math

import torch

try:  # optional: a CPU-only install may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

LOG2E = 1.4426950408889634
# Fewest context tokens per split: one whole tile. Every split also writes float32 partials for
# the merge to read back; at 12 query heads per KV head those are 1/5 of a 64-token split's bf16
# KV, so smaller splits would cost more traffic than their parallelism wins.
PARTITION = 64
# 32 splits x 8 KV heads = 256 programs at batch 1, about two per SM of an H200: more splits only
# add merge traffic once the GPU is full
MAX_SPLITS = 32
TILE = 64  # tokens per loop iteration of a split (at least one page)


def splits_for_context(max_context: int, partition: int = PARTITION) -> int:
    """A fixed split count for every context up to ``max_context`` tokens."""
    return min(MAX_SPLITS, max(1, math.ceil(max_context / partition)))


def paged_decode_reference(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    scale: float,
) -> torch.Tensor:  # [B, Hq, D] q.dtype
    block_size, hk = k_cache.shape[1], k_cache.shape[2]
    groups = q.shape[1] // hk
    out = torch.empty_like(q)
    for b, n in enumerate(seq_lens.tolist()):
        blocks = block_tables[b, : (n + block_size - 1) // block_size].long()
        k = k_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(groups, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(groups, dim=1)
        probs = (torch.einsum("hd,nhd->hn", q[b].float(), k) * scale).softmax(-1)
        out[b] = torch.einsum("hn,nhd->hd", probs, v).to(q.dtype)
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, each >= 1
    max_seqlen_k: int,  # unused when num_splits is given
    scale: float,
    # fewest context tokens per split, a multiple of block_size; None = max(PARTITION, block_size)
    partition: int | None = None,
    # fixed split count in [1, MAX_SPLITS]; None = splits_for_context(max_seqlen_k, partition)
    num_splits: int | None = None,
) -> torch.Tensor:  # [B, Hq, D] q.dtype
    if triton is None:
        raise RuntimeError("paged_decode_attention needs triton")
    b, hq, d = q.shape
    _, block_size, hk, _ = k_cache.shape
    partition = max(PARTITION, block_size) if partition is None else partition
    splits = splits_for_context(max_seqlen_k, partition) if num_splits is None else num_splits
    _check(q, k_cache, v_cache, block_size, partition, splits)
    groups = hq // hk
    acc = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    m = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    # tl.dot needs at least 16 rows on GPUs: pad the query group with masked rows
    groups_pad = max(16, triton.next_power_of_2(groups))
    _split_kernel[(b, hk, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, acc, m, l_sum,
        scale * LOG2E, splits, partition // block_size,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2),
        m.stride(0), m.stride(1),
        GROUPS=groups, GROUPS_PAD=groups_pad, HEAD_DIM=d, PAGE=block_size,
        TILE=max(TILE, block_size),
    )  # fmt: skip
    out = torch.empty_like(q)
    _merge_kernel[(b, hq)](
        acc, m, l_sum, out, splits,
        acc.stride(0), acc.stride(1), acc.stride(2),
        m.stride(0), m.stride(1),
        out.stride(0), out.stride(1),
        SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=d,
    )  # fmt: skip
    return out


def _check(q, k_cache, v_cache, block_size: int, partition: int, splits: int) -> None:
    d, hk = q.shape[2], k_cache.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share shape and layout")
    if q.shape[1] % hk or k_cache.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if d & (d - 1) or block_size & (block_size - 1):
        raise ValueError("head_dim and block_size must be powers of two")
    if partition <= 0 or partition % block_size:
        raise ValueError(f"partition {partition} is not a multiple of block_size {block_size}")
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"num_splits {splits} is not in [1, {MAX_SPLITS}]")
    if q.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("q and the cache need a contiguous last dim")


if triton is not None:

    @triton.jit
    def _split_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, acc_ptr, m_ptr, l_ptr,
        scale_log2, n_splits, min_pages,
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_tb,
        stride_ab, stride_ah, stride_as,
        stride_mb, stride_mh,
        GROUPS: tl.constexpr, GROUPS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        PAGE: tl.constexpr, TILE: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(lens_ptr + seq)
        g = tl.arange(0, GROUPS_PAD)
        d = tl.arange(0, HEAD_DIM)
        n = tl.arange(0, TILE)
        heads = kv_head * GROUPS + g
        rows = g < GROUPS
        q_off = seq * stride_qb + heads[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptr + q_off, mask=rows[:, None], other=0.0)
        m_i = tl.full([GROUPS_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUPS_PAD], tl.float32)
        acc = tl.zeros([GROUPS_PAD, HEAD_DIM], tl.float32)
        n_pages = tl.cdiv(seq_len, PAGE)
        per_split = tl.maximum(tl.cdiv(n_pages, n_splits), min_pages)
        first = split * per_split
        # the split's keys are positions [first * PAGE, end); past the context it is empty
        end = tl.minimum(tl.minimum(first + per_split, n_pages) * PAGE, seq_len)
        table = tables_ptr + seq * stride_tb
        kv_base = kv_head * stride_kh + d[None, :]
        for start in range(first * PAGE, end, TILE):
            pos = start + n  # [TILE] context positions
            keep = pos < end  # masks the context's tail and the next split's pages
            # every token's block id in one gather: a page's tokens share (and cache) an entry
            block = tl.load(table + pos // PAGE, mask=keep, other=0).to(tl.int64)
            kv_off = block[:, None] * stride_kb + (pos % PAGE)[:, None] * stride_kt + kv_base
            # masked, not just weighted 0: a slot past the context may hold NaN
            k = tl.load(k_ptr + kv_off, mask=keep[:, None], other=0.0)  # [TILE, D]
            v = tl.load(v_ptr + kv_off, mask=keep[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # [G, TILE]
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: a tile's first key is in the split
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new
        # a split past the context stores only m = -inf, l = 0: the merge skips its acc rows
        a_off = seq * stride_ab + heads[:, None] * stride_ah + split * stride_as + d[None, :]
        tl.store(acc_ptr + a_off, acc, mask=rows[:, None] & (first * PAGE < end))
        ml_off = seq * stride_mb + heads * stride_mh + split
        tl.store(m_ptr + ml_off, m_i, mask=rows)
        tl.store(l_ptr + ml_off, l_i, mask=rows)

    @triton.jit
    def _merge_kernel(
        acc_ptr, m_ptr, l_ptr, out_ptr, n_splits,
        stride_ab, stride_ah, stride_as,
        stride_mb, stride_mh,
        stride_ob, stride_oh,
        SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):  # fmt: skip
        # one program holds all of a head's partials, [SPLITS_PAD, D] float32 (16 KB at 32 x
        # 128): what bounds MAX_SPLITS
        seq = tl.program_id(0)
        head = tl.program_id(1)
        s = tl.arange(0, SPLITS_PAD)
        d = tl.arange(0, HEAD_DIM)
        valid = s < n_splits
        ml_off = seq * stride_mb + head * stride_mh + s
        m = tl.load(m_ptr + ml_off, mask=valid, other=float("-inf"))
        l_s = tl.load(l_ptr + ml_off, mask=valid, other=0.0)
        w = tl.exp2(m - tl.max(m, 0))  # [SPLITS_PAD]; empty splits weigh 0
        a_off = seq * stride_ab + head * stride_ah + s[:, None] * stride_as + d[None, :]
        # an empty split never wrote its acc rows (0 * garbage could be NaN): not read
        acc = tl.load(acc_ptr + a_off, mask=(valid & (l_s > 0))[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], 0) / tl.sum(l_s * w, 0)
        o_off = seq * stride_ob + head * stride_oh + d
        tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty))
