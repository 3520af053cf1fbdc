"""Dynamic FP8 (e4m3) quantisation of activations: one scale per token or per 128-wide block.

Contract: for ``x [T, K]`` (bf16, fp16 or fp32)
- ``quant_fp8_per_token(x)`` -> ``Fp8Quant(q [T, K] float8_e4m3fn, scale [T, 1] float32)``;
- ``quant_fp8_per_block(x, block=128)`` -> ``Fp8Quant(q [T, K], scale [T, ceil(K/block)])``,
  one scale per ``block`` consecutive columns of a token (the last block may be short);
with ``scale = max(amax, AMAX_FLOOR) / 448`` over the token (or block) in float32 and
``q = clamp(x / scale, -448, 448)`` rounded to nearest-even e4m3, so ``q * scale`` approximates
``x``. The floor keeps all-zero rows finite (they quantise to zeros). The division is an IEEE
float32 division on both paths, so kernel and ``*_reference`` (the torch definitions) agree
exactly up to the conversion's rounding of exact ties. Scales are row-major ``[T, n_blocks]``.

Kernels: per token, a program walks its row twice in ``BLOCK`` chunks (amax, then quantise;
the second read is served by L2); per block, a program takes a ``[blocks, block]`` tile of one
token. Grids come from the shapes only, nothing is read on the host (CUDA-graph safe). FP8
stores need an sm_89+ GPU or ``TRITON_INTERPRET=1`` (the CPU tests).

What does not belong here: FP8 GEMMs, weight quantisation, the choice of path (not wired yet).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

try:  # optional: a CPU-only install may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
AMAX_FLOOR = 1e-10
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class Fp8Quant(NamedTuple):
    q: torch.Tensor  # [T, K] float8_e4m3fn
    scale: torch.Tensor  # [T, 1] or [T, ceil(K/block)] float32; x ~= q * scale


def quant_fp8_per_token_reference(x: torch.Tensor) -> Fp8Quant:  # x [T, K]
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp_min(AMAX_FLOOR) / FP8_MAX  # [T, 1]
    return Fp8Quant((xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale)


def quant_fp8_per_block_reference(x: torch.Tensor, block: int = 128) -> Fp8Quant:  # x [T, K]
    t, k = x.shape
    n_blocks = math.ceil(k / block)
    # zero padding never raises a block's amax
    xf = torch.nn.functional.pad(x.float(), (0, n_blocks * block - k)).view(t, n_blocks, block)
    scale = xf.abs().amax(-1, keepdim=True).clamp_min(AMAX_FLOOR) / FP8_MAX  # [T, nb, 1]
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(t, -1)[:, :k]
    return Fp8Quant(q.contiguous(), scale.view(t, n_blocks))


def quant_fp8_per_token(x: torch.Tensor) -> Fp8Quant:  # x [T, K]
    x = _check(x)
    t, k = x.shape
    q = torch.empty(t, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(t, 1, dtype=torch.float32, device=x.device)
    if t and k:
        block = min(4096, triton.next_power_of_2(k))
        _per_token_kernel[(t,)](
            x, q, scale, x.stride(0), q.stride(0), k,
            FP8_MAX=FP8_MAX, FLOOR=AMAX_FLOOR, BLOCK=block, num_warps=min(8, max(1, block // 256)),
        )  # fmt: skip
    return Fp8Quant(q, scale)


def quant_fp8_per_block(x: torch.Tensor, block: int = 128) -> Fp8Quant:  # x [T, K]
    x = _check(x)
    if block < 16 or block & (block - 1):
        raise ValueError(f"block {block} must be a power of two >= 16")
    t, k = x.shape
    n_blocks = math.ceil(k / block)
    q = torch.empty(t, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(t, n_blocks, dtype=torch.float32, device=x.device)
    if t and k:
        per_prog = min(8, triton.next_power_of_2(n_blocks))
        _per_block_kernel[(t, triton.cdiv(n_blocks, per_prog))](
            x, q, scale, x.stride(0), q.stride(0), scale.stride(0), k, n_blocks,
            FP8_MAX=FP8_MAX, FLOOR=AMAX_FLOOR, BLOCK=block, PER_PROG=per_prog, num_warps=4,
        )  # fmt: skip
    return Fp8Quant(q, scale)


def _check(x: torch.Tensor) -> torch.Tensor:  # -> [T, K] with a contiguous last dim
    if triton is None:
        raise RuntimeError("the fp8 quantisation kernels need triton")
    if x.dim() != 2 or x.dtype not in DTYPES:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype}: expected [T, K] bf16/fp16/fp32")
    return x if x.stride(-1) == 1 else x.contiguous()


if triton is not None:

    @triton.jit
    def _per_token_kernel(
        x_ptr, q_ptr, scale_ptr, stride_x, stride_q, n_cols,
        FP8_MAX: tl.constexpr, FLOOR: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        tok = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            m = start + cols < n_cols
            x = tl.load(x_ptr + tok * stride_x + start + cols, mask=m, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), FLOOR), FP8_MAX)
        tl.store(scale_ptr + tok, scale)
        for start in range(0, n_cols, BLOCK):
            m = start + cols < n_cols
            x = tl.load(x_ptr + tok * stride_x + start + cols, mask=m, other=0.0)
            y = tl.math.div_rn(x.to(tl.float32), tl.zeros([BLOCK], tl.float32) + scale)
            y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
            tl.store(q_ptr + tok * stride_q + start + cols, y.to(q_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _per_block_kernel(
        x_ptr, q_ptr, scale_ptr, stride_x, stride_q, stride_s, n_cols, n_blocks,
        FP8_MAX: tl.constexpr, FLOOR: tl.constexpr, BLOCK: tl.constexpr, PER_PROG: tl.constexpr,
    ):  # fmt: skip
        tok = tl.program_id(0).to(tl.int64)
        blocks = tl.program_id(1) * PER_PROG + tl.arange(0, PER_PROG)  # [PER_PROG]
        cols = blocks[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # [PER_PROG, BLOCK]
        m = (cols < n_cols) & (blocks < n_blocks)[:, None]
        x = tl.load(x_ptr + tok * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), FLOOR)  # [PER_PROG]
        scale = tl.math.div_rn(amax, tl.zeros([PER_PROG], tl.float32) + FP8_MAX)
        tl.store(scale_ptr + tok * stride_s + blocks, scale, mask=blocks < n_blocks)
        y = tl.math.div_rn(x, tl.zeros([PER_PROG, BLOCK], tl.float32) + scale[:, None])
        y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
        tl.store(q_ptr + tok * stride_q + cols, y.to(q_ptr.dtype.element_ty), mask=m)
