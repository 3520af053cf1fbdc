"""Partial NeoX (rotate-half) rotary embedding applied in place, from per-token cos / sin.

Contract: ``rotary_(x, cos, sin, rotary_dim)`` rotates the first ``rotary_dim`` dims of every
head of ``x [T, H, D]`` in place: with ``half = rotary_dim / 2``, dim ``i < half`` pairs with
``i + half``; ``x1' = x1*cos - x2*sin``, ``x2' = x2*cos + x1*sin``; dims from ``rotary_dim`` on
are not touched. ``cos`` / ``sin`` are ``[T, 1, half]`` in ``x.dtype`` (the M-RoPE layer has
already picked each frequency's t / h / w position), shared by all heads of a token. Every product
and sum is rounded to ``x.dtype`` exactly where the torch ops round it, so bf16 results match
``rotary_reference_`` bit for bit. ``x`` may be a strided view (the q|k heads inside a fused qkv
row) as long as its last dim is contiguous. ``rotary_reference_`` is the torch definition (also
the layer's CPU path).

``rotary_f32_(x, cos, sin, rotary_dim)`` is the same rotation with float32 ``cos`` / ``sin``
computed wholly in float32 and rounded to ``x.dtype`` once, as the vision tower (and
transformers' GLM-4V vision rotary) does: ``rotary_f32_reference_`` is its torch definition.

Kernel: a program per (token, block of heads) loads the token's cos / sin once and rotates its
heads; the grid comes from the shapes only and nothing is read on the host (CUDA-graph safe).
Needs Triton; on CPU it runs only under ``TRITON_INTERPRET=1`` (what the tests use).

What does not belong here: computing cos / sin or positions (``models/layers/rotary.py``).
"""

from __future__ import annotations

import torch

try:  # optional: a CPU-only install may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def rotary_reference_(
    x: torch.Tensor,  # [T, H, D], rotated in place
    cos: torch.Tensor,  # [T, 1, rotary_dim/2] x.dtype
    sin: torch.Tensor,  # [T, 1, rotary_dim/2] x.dtype
    rotary_dim: int,
) -> None:
    # the same four products and two sums as x1*cos - x2*sin | x2*cos + x1*sin, each
    # rounded the same way, without a concatenated copy of the heads
    half = rotary_dim // 2
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    x1_sin = x1 * sin
    x1.mul_(cos).sub_(x2 * sin)
    x2.mul_(cos).add_(x1_sin)


def rotary_f32_reference_(
    x: torch.Tensor,  # [T, H, D], rotated in place
    cos: torch.Tensor,  # [T, 1, rotary_dim/2] float32
    sin: torch.Tensor,  # [T, 1, rotary_dim/2] float32
    rotary_dim: int,
) -> None:
    half = rotary_dim // 2
    x1, x2 = x[..., :half].float(), x[..., half:rotary_dim].float()  # views when float32
    out1, out2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin  # both before either write
    x[..., :half] = out1
    x[..., half:rotary_dim] = out2


def supported(x: torch.Tensor, cos: torch.Tensor, rotary_dim: int, f32: bool = False) -> bool:
    """True when the kernel handles these operands (else use the reference); ``f32``: the
    float32 variant of ``rotary_f32_``."""
    return (
        triton is not None
        and x.dim() == 3
        and x.dtype in DTYPES
        and cos.dtype == (torch.float32 if f32 else x.dtype)
        and x.stride(-1) == 1
        and 0 < rotary_dim <= x.shape[-1]
        and rotary_dim % 2 == 0
    )


def rotary_(
    x: torch.Tensor,  # [T, H, D], last dim contiguous; rotated in place
    cos: torch.Tensor,  # [T, 1, rotary_dim/2] x.dtype
    sin: torch.Tensor,  # [T, 1, rotary_dim/2] x.dtype
    rotary_dim: int,
) -> None:
    _launch(x, cos, sin, rotary_dim, f32=False)


def rotary_f32_(
    x: torch.Tensor,  # [T, H, D], last dim contiguous; rotated in place
    cos: torch.Tensor,  # [T, 1, rotary_dim/2] float32
    sin: torch.Tensor,  # [T, 1, rotary_dim/2] float32
    rotary_dim: int,
) -> None:
    _launch(x, cos, sin, rotary_dim, f32=True)


def _launch(x, cos, sin, rotary_dim: int, f32: bool) -> None:
    if triton is None:
        raise RuntimeError("the rotary kernel needs triton")
    if not supported(x, cos, rotary_dim, f32) or sin.dtype != cos.dtype:
        want = "float32" if f32 else "x's dtype"
        raise ValueError(
            f"rotary kernel: x {tuple(x.shape)} {x.dtype} stride {x.stride()}, cos {cos.dtype}, "
            f"rotary_dim {rotary_dim} (3-D x, contiguous last dim, cos/sin in {want})"
        )
    t, h, _ = x.shape
    half = rotary_dim // 2
    cos2, sin2 = _per_token(cos, t, half), _per_token(sin, t, half)
    if t == 0 or h == 0:
        return
    block_h = min(16, triton.next_power_of_2(h))
    _rotary_kernel[(t, triton.cdiv(h, block_h))](
        x, cos2, sin2,
        x.stride(0), x.stride(1), cos2.stride(0), sin2.stride(0),
        h, half,
        BLOCK_H=block_h, HALF_PAD=triton.next_power_of_2(half), ROUND_EACH=not f32,
        num_warps=2 if half <= 32 else 4,
    )  # fmt: skip


def _per_token(c: torch.Tensor, t: int, half: int) -> torch.Tensor:  # -> [T, half]
    if c.numel() != t * half:
        raise ValueError(f"cos/sin {tuple(c.shape)} do not hold {half} values per token of {t}")
    c = c.reshape(t, half)
    return c if c.stride(-1) == 1 else c.contiguous()


if triton is not None:

    @triton.jit
    def _rotary_kernel(
        x_ptr, cos_ptr, sin_ptr,
        stride_xt, stride_xh, stride_ct, stride_st,
        n_heads, half,
        BLOCK_H: tl.constexpr, HALF_PAD: tl.constexpr, ROUND_EACH: tl.constexpr,
    ):  # fmt: skip
        tok = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        j = tl.arange(0, HALF_PAD)
        cos = tl.load(cos_ptr + tok * stride_ct + j, mask=j < half, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + tok * stride_st + j, mask=j < half, other=0.0).to(tl.float32)
        cos, sin = cos[None, :], sin[None, :]
        mask = (heads < n_heads)[:, None] & (j < half)[None, :]
        off1 = tok * stride_xt + heads.to(tl.int64)[:, None] * stride_xh + j[None, :]
        x1 = tl.load(x_ptr + off1, mask=mask, other=0.0)
        x2 = tl.load(x_ptr + off1 + half, mask=mask, other=0.0)
        dt = x1.dtype
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        a_sin, b_sin, a_cos, b_cos = a * sin, b * sin, a * cos, b * cos
        if ROUND_EACH:
            # round after every op like the unfused torch ops (a no-op in float32)
            a_sin = a_sin.to(dt).to(tl.float32)
            b_sin = b_sin.to(dt).to(tl.float32)
            a_cos = a_cos.to(dt).to(tl.float32)
            b_cos = b_cos.to(dt).to(tl.float32)
        tl.store(x_ptr + off1, (a_cos - b_sin).to(dt), mask=mask)
        tl.store(x_ptr + off1 + half, (b_cos + a_sin).to(dt), mask=mask)
