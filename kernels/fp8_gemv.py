"""Decode-sized GEMM with FP8 weights and unquantised activations (W8A16).

Contract: ``w8a16_linear(x, q, scale, bias)`` takes ``x [M, K]`` bf16 / fp16, ``q [N, K]``
``float8_e4m3fn`` codes and ``scale [N, 1]`` float32 (one per output row) and an optional ``bias
[N]`` of ``x.dtype``, and returns ``x @ (q * scale).T + bias`` as ``[M, N]`` in ``x.dtype``: float32
accumulation, the row scale applied to the sums, rounded once. ``supported(x, q)`` says whether
the operands fit: at most ``MAX_ROWS`` rows, where the GEMM is bound by reading the codes; larger
batches are compute bound and belong to ``torch._scaled_mm``. ``w8a16_reference`` is the torch
definition (dequantise, then a plain GEMM).

Why: at decode sizes the row-wise ``torch._scaled_mm`` needs a separate activation-quantisation
kernel and picks tiles made for large M; this kernel reads each code once, widens it to the
activations' dtype for the tensor cores, and keeps the activations exact.

Kernel: a grid of (row block, column block, K split) programs over ``N``; each streams its
``BLOCK_N`` weight rows along its share of ``K`` and reduces against ``BLOCK_M`` activation rows
(tiles per output width from a small sweep on an H200, ``_tiles``). With one split the program
applies the scale and bias and stores; with ``SPLIT_K > 1`` (more programs in flight for narrow
outputs with a long ``K``, such as the attention output projection) each split stores its
float32 partial sums and a second kernel adds the splits in a fixed order, then scales, adds the
bias and rounds (deterministic: no atomics). The grid depends on shapes only (CUDA-graph safe).
``bench/kernels_bench.py --w8a16-sweep`` times the tile and split choices. Needs Triton; on CPU
it runs only under ``TRITON_INTERPRET=1`` (the tests).

What does not belong here: the path choice and weight storage (``models/layers/fp8.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional: a CPU-only install may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

FP8_DTYPE = torch.float8_e4m3fn
MAX_ROWS = 32
BLOCK_M = 16  # tl.dot's smallest M


def w8a16_reference(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:  # [M, N] x.dtype
    return F.linear(x.float(), q.float() * scale, None if bias is None else bias.float()).to(
        x.dtype
    )


def supported(x: torch.Tensor, q: torch.Tensor) -> bool:
    return (
        triton is not None
        and x.dim() == 2
        and q.dim() == 2
        and x.dtype in (torch.bfloat16, torch.float16)
        and q.dtype == FP8_DTYPE
        and x.shape[1] == q.shape[1]
        and 0 < x.shape[0] <= MAX_ROWS
        and q.stride(1) == 1
        and q.shape[0] >= 16
    )


def w8a16_linear(
    x: torch.Tensor,  # [M, K]
    q: torch.Tensor,  # [N, K] float8_e4m3fn
    scale: torch.Tensor,  # [N, 1] float32
    bias: torch.Tensor | None = None,  # [N] x.dtype
    tiles: tuple[int, ...] | None = None,  # (block_n, block_k, warps, stages[, split_k]);
    # None = the table below (benchmarks pass their own)
) -> torch.Tensor:  # [M, N] x.dtype
    if triton is None:
        raise RuntimeError("w8a16_linear needs triton")
    if not supported(x, q):
        raise ValueError(
            f"w8a16_linear: x {tuple(x.shape)} {x.dtype}, q {tuple(q.shape)} {q.dtype} "
            f"(2-D, bf16/fp16 activations, FP8 codes, 1..{MAX_ROWS} rows)"
        )
    m, k = x.shape
    n = q.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    scale = scale.reshape(n)
    block_n, block_k, warps, stages, *rest = tiles or _tiles(m, n, k)
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    steps = triton.cdiv(k, block_k)
    split = max(1, min(rest[0] if rest else 1, steps))
    steps_per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, steps_per_split)  # no empty split
    row_blocks = triton.cdiv(m, BLOCK_M)
    partial = (
        torch.empty(split, row_blocks * BLOCK_M, n, dtype=torch.float32, device=x.device)
        if split > 1
        else out  # never read: the single split stores the result itself
    )
    _w8a16_kernel[(row_blocks, triton.cdiv(n, block_n), split)](
        x, q, scale, bias if bias is not None else scale, out, partial,
        m, n, k, x.stride(0), q.stride(0), out.stride(0), steps_per_split,
        HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, SPLIT=split > 1, num_stages=stages, num_warps=warps,
    )  # fmt: skip
    if split > 1:
        reduce_n = min(1024, triton.next_power_of_2(n))
        _w8a16_reduce_kernel[(m, triton.cdiv(n, reduce_n))](
            partial, scale, bias if bias is not None else scale, out,
            n, partial.stride(0), partial.stride(1), out.stride(0),
            SPLITS=split, HAS_BIAS=bias is not None, BLOCK_N=reduce_n,
        )  # fmt: skip
    return out


def _tiles(m: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    # (block_n, block_k, warps, stages, split_k): the fastest of ``bench/kernels_bench.py
    # --w8a16-sweep`` on an H200 at GLM-4.5V projection shapes, 2026-12-02. Wide outputs keep a
    # 256 reduction step and split K in two for a single row (qkv 25.7 -> 23.8 us, gate/up 36.1 ->
    # 34.6 us); narrow outputs (N 4096, K 11-12k) split K four ways (o_proj at M=1 26.0 -> 21.8 us,
    # MLP down 27.6 -> 19.5 us; at M=32 with 64-wide tiles 49.5 -> 37.8 and 53.3 -> 34.5 us).
    if n >= 8192:
        return (32, 256, 4, 3, 2 if m <= BLOCK_M else 1)
    return (32, 256, 4, 3, 4) if m <= BLOCK_M else (64, 256, 4, 3, 4)


if triton is not None:

    @triton.jit
    def _w8a16_kernel(
        x_ptr, q_ptr, s_ptr, b_ptr, o_ptr, p_ptr,
        m, n, k, stride_x, stride_q, stride_o, steps_per_split,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, SPLIT: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        wcols = cols % n  # wrapped: the weight loads need no column mask, the store drops them
        first = tl.program_id(2) * steps_per_split  # this split's first K step
        last = tl.minimum(first + steps_per_split, tl.cdiv(k, BLOCK_K))
        ks = tl.arange(0, BLOCK_K)
        k0 = first * BLOCK_K
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + (k0 + ks)[None, :]
        q_ptrs = q_ptr + wcols[None, :].to(tl.int64) * stride_q + (k0 + ks)[:, None]  # [BK, N]
        live = rows < m
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(first, last):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=live[:, None], other=0.0)
                b = tl.load(q_ptrs)
            else:
                left = k - kk * BLOCK_K
                a = tl.load(x_ptrs, mask=live[:, None] & (ks[None, :] < left), other=0.0)
                b = tl.load(q_ptrs, mask=ks[:, None] < left, other=0.0)
            acc = tl.dot(a, b.to(a.dtype), acc)
            x_ptrs += BLOCK_K
            q_ptrs += BLOCK_K
        if SPLIT:  # float32 partial sums [split, rows, N]; the reduce kernel finishes
            stride_ps = tl.num_programs(0) * BLOCK_M * n
            p_ptrs = (
                p_ptr + tl.program_id(2).to(tl.int64) * stride_ps
                + rows[:, None].to(tl.int64) * n + cols[None, :]
            )  # fmt: skip
            tl.store(p_ptrs, acc, mask=live[:, None] & (cols[None, :] < n))
        else:
            acc = acc * tl.load(s_ptr + wcols)[None, :]
            if HAS_BIAS:
                acc = acc + tl.load(b_ptr + wcols).to(tl.float32)[None, :]
            o_ptrs = o_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :]
            out_mask = live[:, None] & (cols[None, :] < n)
            tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _w8a16_reduce_kernel(
        p_ptr, s_ptr, b_ptr, o_ptr,
        n, stride_ps, stride_pm, stride_o,
        SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = cols < n
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for split in tl.static_range(SPLITS):  # a fixed order: deterministic sums
            acc += tl.load(p_ptr + split * stride_ps + row * stride_pm + cols, mask=live)
        acc = acc * tl.load(s_ptr + cols, mask=live, other=0.0)
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + cols, mask=live, other=0.0).to(tl.float32)
        tl.store(o_ptr + row * stride_o + cols, acc.to(o_ptr.dtype.element_ty), mask=live)
