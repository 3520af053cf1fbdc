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

Kernel: a grid of (row block, column block) programs over ``N``; each streams its ``BLOCK_N`` weight
rows along ``K`` and reduces against ``BLOCK_M`` activation rows (tiles per output width from a
small sweep on an H200, ``_tiles``). The grid depends on shapes only (CUDA-graph safe). Needs Triton; on CPU
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
    tiles: tuple[int, int, int, int] | None = None,  # (block_n, block_k, warps, stages); None =
    # the table below (benchmarks pass their own)
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
    block_n, block_k, warps, stages = tiles or _tiles(n)
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    _w8a16_kernel[(triton.cdiv(m, BLOCK_M), triton.cdiv(n, block_n))](
        x, q, scale, bias if bias is not None else scale, out,
        m, n, k, x.stride(0), q.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, num_stages=stages, num_warps=warps,
    )  # fmt: skip
    return out


def _tiles(n: int) -> tuple[int, int, int, int]:  # (block_n, block_k, warps, stages)
    # the fastest of a small sweep at batch 1 on an H200 (GLM-4.5V projection shapes): wide
    # outputs keep a 256 reduction step, narrow ones (N 2816-4096) stream longer K runs
    return (32, 256, 4, 3) if n >= 8192 else (32, 512, 4, 5)


if triton is not None:

    @triton.jit
    def _w8a16_kernel(
        x_ptr, q_ptr, s_ptr, b_ptr, o_ptr,
        m, n, k, stride_x, stride_q, stride_o,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        wcols = cols % n  # wrapped: the weight loads need no column mask, the store drops them
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :]
        q_ptrs = q_ptr + wcols[None, :].to(tl.int64) * stride_q + ks[:, None]  # [BLOCK_K, N]
        live = rows < m
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, tl.cdiv(k, BLOCK_K)):
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
        acc = acc * tl.load(s_ptr + wcols)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + wcols).to(tl.float32)[None, :]
        o_ptrs = o_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :]
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=live[:, None] & (cols[None, :] < n))
