"""SwiGLU's gate: ``silu(gate) * up`` in one pass over two (possibly strided) operands.

Contract: ``silu_mul(gate, up)`` takes ``[M, N]`` tensors of one dtype (bf16, fp16 or fp32)
whose last dim is contiguous (row strides may differ: the two halves of a fused gate|up GEMM
output are views of one buffer) and returns a new contiguous ``[M, N]`` tensor. It rounds where
the unfused torch ops round: ``silu`` is computed in float32 and rounded to the dtype, then the
product is computed in float32 and rounded again, so results equal ``F.silu(gate) * up``
(``silu_mul_reference``) up to the last bit the exp implementation can move.

Kernel: a 2-D grid of (row, column block) programs, each reads its two slices once and writes one;
the grid depends on shapes only and nothing is read on the host (CUDA-graph safe). Needs Triton; on
CPU it runs only under ``TRITON_INTERPRET=1`` (what the tests use).

What does not belong here: choosing the path (``models/layers/activation.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional: a CPU-only install may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_N = 1024


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def supported(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return (
        triton is not None
        and gate.dim() == 2
        and gate.shape == up.shape
        and gate.dtype == up.dtype
        and gate.dtype in DTYPES
        and gate.stride(-1) == 1
        and up.stride(-1) == 1
    )


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # [M, N] x2 -> [M, N]
    if triton is None:
        raise RuntimeError("silu_mul needs triton")
    if not supported(gate, up):
        raise ValueError(
            f"silu_mul: gate {tuple(gate.shape)} {gate.dtype} stride {gate.stride()}, "
            f"up {tuple(up.shape)} {up.dtype} stride {up.stride()} (2-D, same shape and dtype, "
            "contiguous last dim)"
        )
    m, n = gate.shape
    out = torch.empty(m, n, dtype=gate.dtype, device=gate.device)
    if m == 0 or n == 0:
        return out
    block = min(BLOCK_N, triton.next_power_of_2(n))
    _silu_mul_kernel[(m, triton.cdiv(n, block))](
        gate, up, out, gate.stride(0), up.stride(0), out.stride(0), n,
        BLOCK=block, num_warps=4,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(
        g_ptr, u_ptr, o_ptr, stride_g, stride_u, stride_o, n,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        g = tl.load(g_ptr + row * stride_g + cols, mask=mask, other=0.0)
        u = tl.load(u_ptr + row * stride_u + cols, mask=mask, other=0.0)
        dt = g.dtype
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(dt)  # rounded like torch's silu output
        out = (act.to(tl.float32) * u.to(tl.float32)).to(dt)
        tl.store(o_ptr + row * stride_o + cols, out, mask=mask)
