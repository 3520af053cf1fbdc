"""Paged decode attention for grouped-query heads, split along the context (split-K).

Contract: ``paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, max_seqlen_k,
scale)`` returns ``[B, Hq, D]`` in ``q.dtype``: for each sequence ``b`` its one query token
attends (no mask beyond the context) to the ``seq_lens[b]`` keys stored, in order, in the cache
blocks ``block_tables[b, 0..]``. Query head ``h`` reads KV head ``h // (Hq // Hk)``.
``k_cache`` / ``v_cache`` are one layer's halves of the paged cache: ``[num_blocks, block_size,
Hk, D]`` with a contiguous last dim (``kv_cache[0]`` / ``kv_cache[1]`` of the layer). Table entries
past a sequence's last block are never read.

Kernel: one program per (sequence, KV head, context split) computes all the query heads of that
KV head against each cache block of its split (so a block is read once for its whole group), with
an online softmax in float32; a second kernel merges the splits with their log-sum-exp weights.
Splitting keeps the GPU busy at batch 1 on long contexts. Split ``s`` of a sequence covers its
pages ``[s * p, (s + 1) * p)`` with ``p = max(ceil(pages / splits), partition / block_size)``: by
default ``splits = ceil(max_seqlen_k / partition)`` (so ``p`` is the partition); ``num_splits``
fixes the count instead (a CUDA graph is captured once for every context length: choose it with
``splits_for_context(max_model_len)``), and each sequence then spreads its own pages evenly over
the splits, so its result depends only on its own length, never on the batch around it. The
launch reads no device value on the host (capturable). ``paged_decode_reference`` is the torch
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
MAX_SPLITS = 16  # past this the merge traffic grows faster than the parallelism helps


def splits_for_context(max_context: int, partition: int = 512) -> int:
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
    partition: int = 512,  # context tokens per split (at least); a multiple of block_size
    num_splits: int | None = None,  # fixed split count; None = ceil(max_seqlen_k / partition)
) -> torch.Tensor:  # [B, Hq, D] q.dtype
    if triton is None:
        raise RuntimeError("paged_decode_attention needs triton")
    b, hq, d = q.shape
    _, block_size, hk, _ = k_cache.shape
    _check(q, k_cache, v_cache, block_size, partition)
    groups = hq // hk
    splits = num_splits if num_splits is not None else math.ceil(max_seqlen_k / partition)
    splits = max(1, splits)
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


def _check(q, k_cache, v_cache, block_size: int, partition: int) -> None:
    d, hk = q.shape[2], k_cache.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must share shape and layout")
    if q.shape[1] % hk or k_cache.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if d & (d - 1) or block_size & (block_size - 1):
        raise ValueError("head_dim and block_size must be powers of two")
    if partition % block_size:
        raise ValueError(f"partition {partition} is not a multiple of block_size {block_size}")
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
        PAGE: tl.constexpr,
    ):  # fmt: skip
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        seq_len = tl.load(lens_ptr + seq)
        g = tl.arange(0, GROUPS_PAD)
        d = tl.arange(0, HEAD_DIM)
        t = tl.arange(0, PAGE)
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
        last = tl.minimum(first + per_split, n_pages)
        for page in range(first, last):
            block = tl.load(tables_ptr + seq * stride_tb + page).to(tl.int64)
            kv_off = block * stride_kb + t[:, None] * stride_kt + kv_head * stride_kh + d[None, :]
            k = tl.load(k_ptr + kv_off)  # [PAGE, D]
            v = tl.load(v_ptr + kv_off)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # [G, PAGE]
            s = tl.where((page * PAGE + t < seq_len)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: a page's first key is in context
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            m_i = m_new
        # a split past the context stores only m = -inf, l = 0: the merge skips its acc rows
        a_off = seq * stride_ab + heads[:, None] * stride_ah + split * stride_as + d[None, :]
        tl.store(acc_ptr + a_off, acc, mask=rows[:, None] & (first < last))
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
