"""RMSNorm and fused residual-add + RMSNorm over the last dim, as GLM-4.5V computes them.

Contract: ``rms_norm(x, weight, eps)`` returns ``rmsnorm(x) * weight`` in ``x.dtype``;
``add_rms_norm(x, residual, weight, eps)`` returns ``AddNormOutput(out, residual)`` where
``residual = x + residual`` (rounded to ``x.dtype``, as an unfused add would be) and
``out = rmsnorm(residual) * weight``. Both normalise in float32, cast the normalised row back to
the input dtype and only then multiply by the weight (rounded again), so a bf16 result differs
from the unfused torch ops by at most the last bit the float32 sum order can move. Inputs are
``[..., H]``; bf16, fp16 or fp32, with ``weight`` of the same dtype (the layer keeps torch's
mixed-dtype promotion on its reference path). ``rms_norm_reference`` / ``add_rms_norm_reference``
are the torch definitions (also the layers' CPU path).

Kernel: one program per row holds the whole row in registers (``H <= MAX_HIDDEN``), so each
element is read once and written once; launch grid = number of rows, no host reads (CUDA-graph
safe). Needs Triton; on CPU it runs only under ``TRITON_INTERPRET=1`` (what the tests use).

What does not belong here: the choice of path (the layer's, via ``kernels.dispatch``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

try:  # optional: a CPU-only install may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

MAX_HIDDEN = 32768  # one row must fit one program's registers
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class AddNormOutput(NamedTuple):
    out: torch.Tensor  # [..., H] x.dtype, rmsnorm(x + residual) * weight
    residual: torch.Tensor  # [..., H] x.dtype, x + residual: the next residual stream


def rms_norm_reference(
    x: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [H]
    eps: float,
) -> torch.Tensor:  # [..., H], x.dtype (torch's promotion when weight's dtype differs)
    xf = x.float()
    scale = xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()  # [..., 1] float32
    out = (xf * scale).to(x.dtype)  # a fresh tensor either way: scale it in place
    if out.dtype != weight.dtype:  # mixed dtypes: keep torch's type promotion
        return weight * out
    return out.mul_(weight)


def add_rms_norm_reference(
    x: torch.Tensor,  # [..., H]
    residual: torch.Tensor,  # [..., H] x.dtype
    weight: torch.Tensor,  # [H]
    eps: float,
) -> AddNormOutput:
    h = x + residual
    return AddNormOutput(rms_norm_reference(h, weight, eps), h)


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the kernel handles these operands (else use the reference)."""
    return (
        triton is not None
        and x.dtype in DTYPES
        and weight.dtype == x.dtype
        and weight.dim() == 1
        and x.shape[-1] == weight.shape[0]
        and 0 < x.shape[-1] <= MAX_HIDDEN
    )


def rms_norm(
    x: torch.Tensor,  # [..., H]
    weight: torch.Tensor,  # [H] x.dtype
    eps: float,
) -> torch.Tensor:  # [..., H] x.dtype
    _check(x, weight)
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    _launch(rows, None, weight, out, None, eps)
    return out.view(x.shape)


def add_rms_norm(
    x: torch.Tensor,  # [..., H]
    residual: torch.Tensor,  # [..., H] x.dtype
    weight: torch.Tensor,  # [H] x.dtype
    eps: float,
) -> AddNormOutput:
    _check(x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match x")
    rows, res_rows = _rows(x), _rows(residual)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out)
    _launch(rows, res_rows, weight, out, res_out, eps)
    return AddNormOutput(out.view(x.shape), res_out.view(x.shape))


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("the rmsnorm kernel needs triton")
    if not supported(x, weight):
        raise ValueError(
            f"rmsnorm kernel: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} "
            f"{weight.dtype} (same dtype, bf16/fp16/fp32, H <= {MAX_HIDDEN})"
        )


def _rows(x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [N, H] with unit column stride
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(rows, res_rows, weight, out, res_out, eps: float) -> None:
    n, h = rows.shape
    if n == 0:
        return
    block = triton.next_power_of_2(h)
    has_res = res_rows is not None
    _rms_norm_kernel[(n,)](
        rows, res_rows if has_res else rows, weight.contiguous(), out,
        res_out if has_res else out,
        rows.stride(0), res_rows.stride(0) if has_res else 0, out.stride(0),
        h, eps,
        HAS_RESIDUAL=has_res, BLOCK=block, num_warps=min(16, max(1, block // 512)),
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
        stride_x, stride_r, stride_o,
        n_cols, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        io_dtype = out_ptr.dtype.element_ty
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
            # rounded to the io dtype before the norm reads it, as the unfused add stores it
            x = (x.to(tl.float32) + r.to(tl.float32)).to(io_dtype)
            tl.store(res_out_ptr + row * stride_o + cols, x, mask=mask)
        xf = x.to(tl.float32)
        mean_sq = tl.sum(xf * xf, axis=0) / n_cols
        rstd = tl.math.rsqrt(mean_sq + eps)
        normed = (xf * rstd).to(io_dtype)  # the cast before the weight is the model's order
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = (normed.to(tl.float32) * w.to(tl.float32)).to(io_dtype)
        tl.store(out_ptr + row * stride_o + cols, out, mask=mask)
