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

``rotary_cache_(qkv, num_q_heads, cos, sin, rotary_dim, k_cache, v_cache, slots)`` is the
decoder's attention prologue in one launch: over a fused ``qkv [T, Hq + 2Hk, D]`` row it rotates
the q and k heads in place like ``rotary_`` and writes each token's (rotated) k heads and its v
heads whole to ``k_cache`` / ``v_cache [S, Hk, D]`` at row ``slots[t]`` (int64), as
``rotary_reference_`` followed by two ``index_copy_`` does (``rotary_cache_reference_``), bit
for bit; the caches must have ``qkv``'s dtype.

Kernel: a program per (token, block of heads) loads the token's cos / sin once and rotates its
heads; the grid comes from the shapes only and nothing is read on the host (CUDA-graph safe).
The rounded variants launch with ``enable_fp_fusion=False``: with contraction on, the compiler
narrows each rounded product to a half-precision multiply and folds one product of every pair into
an FMA (``fma(x1, cos, -round(x2*sin))``), skipping a rounding torch does (about a quarter of the
outputs then differ by one ulp; Triton's interpreter never fuses, so only a GPU shows it).
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


def rotary_cache_reference_(
    qkv: torch.Tensor,  # [T, Hq + 2Hk, D]; q and k heads rotated in place
    num_q_heads: int,
    cos: torch.Tensor,  # [T, 1, rotary_dim/2] qkv.dtype
    sin: torch.Tensor,  # [T, 1, rotary_dim/2] qkv.dtype
    rotary_dim: int,
    k_cache: torch.Tensor,  # [S, Hk, D], rows ``slots`` written
    v_cache: torch.Tensor,  # [S, Hk, D]
    slots: torch.Tensor,  # [T] int64
) -> None:
    hk = (qkv.shape[1] - num_q_heads) // 2
    rotary_reference_(qkv[:, : num_q_heads + hk], cos, sin, rotary_dim)
    k_cache.index_copy_(0, slots, qkv[:, num_q_heads : num_q_heads + hk])
    v_cache.index_copy_(0, slots, qkv[:, num_q_heads + hk :])


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


def cache_supported(
    qkv: torch.Tensor, num_q_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> bool:
    """True when ``rotary_cache_`` handles this fused row layout and these caches."""
    if qkv.dim() != 3 or k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        return False
    hk = (qkv.shape[1] - num_q_heads) // 2
    return (
        hk > 0
        and num_q_heads + 2 * hk == qkv.shape[1]
        and k_cache.shape[1:] == (hk, qkv.shape[2])
        and k_cache.dtype == v_cache.dtype == qkv.dtype
        and k_cache.stride(-1) == v_cache.stride(-1) == 1
        and k_cache.stride(0) == v_cache.stride(0)
        and k_cache.stride(1) == v_cache.stride(1)
    )


def rotary_cache_(
    qkv: torch.Tensor,  # [T, Hq + 2Hk, D], last dim contiguous; q and k rotated in place
    num_q_heads: int,
    cos: torch.Tensor,  # [T, 1, rotary_dim/2] qkv.dtype
    sin: torch.Tensor,  # [T, 1, rotary_dim/2] qkv.dtype
    rotary_dim: int,
    k_cache: torch.Tensor,  # [S, Hk, D] qkv.dtype, last dim contiguous
    v_cache: torch.Tensor,  # [S, Hk, D], strides of k_cache
    slots: torch.Tensor,  # [T] int64 cache rows
) -> None:
    if triton is None:
        raise RuntimeError("the rotary kernel needs triton")
    if (
        not supported(qkv, cos, rotary_dim)
        or sin.dtype != cos.dtype
        or not cache_supported(qkv, num_q_heads, k_cache, v_cache)
        or slots.shape != (qkv.shape[0],)
    ):
        raise ValueError(
            f"rotary + cache kernel: qkv {tuple(qkv.shape)} {qkv.dtype} with {num_q_heads} q "
            f"heads, caches {tuple(k_cache.shape)} {k_cache.dtype} / {tuple(v_cache.shape)}, "
            f"slots {tuple(slots.shape)}, cos {cos.dtype} (caches [S, Hk, D] in qkv's dtype)"
        )
    t, h, d = qkv.shape
    half = rotary_dim // 2
    cos2, sin2 = _per_token(cos, t, half), _per_token(sin, t, half)
    if t == 0:
        return
    hk = (h - num_q_heads) // 2
    block_h = min(16, triton.next_power_of_2(h))
    slots = slots if slots.dtype == torch.int64 else slots.long()
    _rotary_cache_kernel[(t, triton.cdiv(h, block_h))](
        qkv, cos2, sin2, k_cache, v_cache, slots,
        qkv.stride(0), qkv.stride(1), cos2.stride(0), sin2.stride(0),
        k_cache.stride(0), k_cache.stride(1),
        num_q_heads, hk, half, rotary_dim, d,
        BLOCK_H=block_h, HALF_PAD=triton.next_power_of_2(half),
        REST_PAD=triton.next_power_of_2(max(d - rotary_dim, 1)),
        num_warps=2 if d <= 64 else 4, enable_fp_fusion=False,  # round every product (see above)
    )  # fmt: skip


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
        enable_fp_fusion=f32,  # the rounded variant must round every product (see above)
    )  # fmt: skip


def _per_token(c: torch.Tensor, t: int, half: int) -> torch.Tensor:  # -> [T, half]
    if c.numel() != t * half:
        raise ValueError(f"cos/sin {tuple(c.shape)} do not hold {half} values per token of {t}")
    c = c.reshape(t, half)
    return c if c.stride(-1) == 1 else c.contiguous()


if triton is not None:

    @triton.jit
    def _rotate(x1, x2, cos, sin, ROUND_EACH: tl.constexpr):
        # (x1*cos - x2*sin, x2*cos + x1*sin) in x1's dtype, cos/sin float32
        dt = x1.dtype
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        a_sin, b_sin, a_cos, b_cos = a * sin, b * sin, a * cos, b * cos
        if ROUND_EACH:
            # round after every op like the unfused torch ops (a no-op in float32)
            a_sin = a_sin.to(dt).to(tl.float32)
            b_sin = b_sin.to(dt).to(tl.float32)
            a_cos = a_cos.to(dt).to(tl.float32)
            b_cos = b_cos.to(dt).to(tl.float32)
        return (a_cos - b_sin).to(dt), (b_cos + a_sin).to(dt)

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
        y1, y2 = _rotate(x1, x2, cos, sin, ROUND_EACH)
        tl.store(x_ptr + off1, y1, mask=mask)
        tl.store(x_ptr + off1 + half, y2, mask=mask)

    @triton.jit
    def _rotary_cache_kernel(
        x_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr,
        stride_xt, stride_xh, stride_ct, stride_st, stride_cs, stride_ch,
        n_q, n_kv, half, rotary_dim, head_dim,
        BLOCK_H: tl.constexpr, HALF_PAD: tl.constexpr, REST_PAD: tl.constexpr,
    ):  # fmt: skip
        # heads [0, n_q) are q, [n_q, n_q + n_kv) k, then v: q and k rotate, k and v are cached
        tok = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        live = heads < n_q + 2 * n_kv
        rotated = heads < n_q + n_kv
        is_k = (heads >= n_q) & rotated
        is_v = (heads >= n_q + n_kv) & live
        kv_head = tl.where(is_k, heads - n_q, heads - n_q - n_kv).to(tl.int64)
        slot = tl.load(slot_ptr + tok)
        row = tok * stride_xt + heads.to(tl.int64)[:, None] * stride_xh  # [BLOCK_H, 1]
        cache_row = slot * stride_cs + kv_head[:, None] * stride_ch
        k_rows, v_rows = is_k[:, None], is_v[:, None]

        j = tl.arange(0, HALF_PAD)
        cos = tl.load(cos_ptr + tok * stride_ct + j, mask=j < half, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + tok * stride_st + j, mask=j < half, other=0.0).to(tl.float32)
        cos, sin = cos[None, :], sin[None, :]
        mask = live[:, None] & (j < half)[None, :]
        x1 = tl.load(x_ptr + row + j[None, :], mask=mask, other=0.0)
        x2 = tl.load(x_ptr + row + j[None, :] + half, mask=mask, other=0.0)
        r1, r2 = _rotate(x1, x2, cos, sin, True)
        rot = rotated[:, None]
        y1 = tl.where(rot, r1, x1)
        y2 = tl.where(rot, r2, x2)
        tl.store(x_ptr + row + j[None, :], y1, mask=mask & rot)
        tl.store(x_ptr + row + j[None, :] + half, y2, mask=mask & rot)
        tl.store(kc_ptr + cache_row + j[None, :], y1, mask=mask & k_rows)
        tl.store(kc_ptr + cache_row + j[None, :] + half, y2, mask=mask & k_rows)
        tl.store(vc_ptr + cache_row + j[None, :], y1, mask=mask & v_rows)
        tl.store(vc_ptr + cache_row + j[None, :] + half, y2, mask=mask & v_rows)
        # dims past the rotary ones are copied as they are
        r = rotary_dim + tl.arange(0, REST_PAD)
        rest_mask = (live & (heads >= n_q))[:, None] & (r < head_dim)[None, :]
        rest = tl.load(x_ptr + row + r[None, :], mask=rest_mask, other=0.0)
        tl.store(kc_ptr + cache_row + r[None, :], rest, mask=rest_mask & k_rows)
        tl.store(vc_ptr + cache_row + r[None, :], rest, mask=rest_mask & v_rows)
