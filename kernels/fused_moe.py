"""Fused routed experts (decode-sized batches; FP8 at any size): slot alignment, two GEMM kernels.

Contract: ``fused_experts(x, w13, w2, route_weights, route_ids, expert_start, foreign_slots)``
takes ``x [T, H]``, ``w13 [E_local, 2I, H]`` (gate rows then up rows), ``w2 [E_local, H, I]``
(all one dtype: bf16, fp16 or fp32, unit stride on the last dim), ``route_weights [T, K]``
float32 and ``route_ids [T, K]`` int64 *global* expert ids, and returns the ``[T, H]`` sum
(float32, or rounded once to ``out_dtype`` by one combine kernel) over k of ``weight[t, k] * w2[e] @ (silu(g) * u)`` with ``g | u = w13[e] @ x[t]`` and
``e = ids[t, k] - expert_start``; slots whose expert lies outside ``[0, E_local)`` add zero (pass
``foreign_slots=False`` only when none can). ``models.layers.moe.experts_reference`` is the torch
definition it is tested against; it differs by rounding only: both GEMMs accumulate in float32,
``h = silu(g) * u`` is rounded once to the weights' dtype and the routed output stays float32.
``supported(x, w13, w2, num_slots)`` says whether these operands fit (``num_slots = T * K <=
MAX_SLOTS``); the caller picks the path.

FP8 weights: with ``w13_scale [E_local, 2I, 1]`` / ``w2_scale [E_local, H, 1]`` float32 (one scale
per output row), ``w13`` / ``w2`` hold ``float8_e4m3fn`` codes and ``x`` is bf16 or fp16. The
kernels read the codes (half the bytes of bf16: decode is bound by them), widen each tile to
``x.dtype`` for the tensor cores, and scale the float32 accumulators per output row, so the
result is that of the dequantised weights ``w.float() * scale`` with unquantised activations.
There is no slot limit: prefill-sized FP8 batches take the same kernels with 128-row blocks
(``supported(..., fp8=True)``).

FP8 activations (W8A8, ``fp8_activations``): prefill-sized FP8 batches are compute-bound, and
Hopper's e4m3 tensor cores run twice bf16's rate. ``x`` is quantised per token
(``quant_fp8.quant_fp8_per_token``: ``x_q [T, H]`` e4m3 and ``x_scale [T, 1]`` float32), the
gate/up kernel multiplies the gathered ``x_q`` rows by the weight codes as they are and scales
its float32 sums by ``x_scale[token] * w13_scale[row]`` before the SiLU-mul; ``h`` (stored in
``x.dtype``) is quantised per slot row by a second launch of the same quantiser, and the down
kernel scales by ``h_scale[row] * weight[slot] * w2_scale[row]``. The result is that of the
dequantised weights applied to the dequantised ``x`` and to the dequantised ``h`` (the tests'
``_w8a8_reference``). The quantiser of ``h`` is a separate launch because a row's amax spans
every I tile, each a different program; it streams ``h`` once more (~0.3 GB at 8,192 tokens
of GLM-4.5-Air, well under a tenth of the down GEMM's time even at the FP8 rate) and also
quantises the unused padded rows (garbage, never read: the down kernel masks them). The default
past ``MAX_SLOTS``: ``fp8_activations=None`` takes ``kernels.dispatch.FP8_ACTIVATIONS`` (on unless
``GLIMPSE_FP8_ACTIVATIONS=0``) there and W8A16 below it, since decode is bound by the weight
reads either way. At 8,192 tokens of GLM-4.5V on an H200 W8A8 took 3.38 ms against W8A16's
6.67 ms, both with their swept tiles (``bench/moe_prefill_bench.py``); per-token dynamic
activations are the released FP8 checkpoints' own scheme.

Steps, none of which reads a device value on the host (the whole call can be captured in a CUDA
graph):
1. ``moe_align.align_slots_triton`` (one launch, decode sizes) or ``moe_align.align_slots``
   (torch ops, past ``MAX_SLOTS``): the ``T*K`` flat slots sorted by local expert, each group
   padded to a multiple of the block rows with the sentinel ``T*K``; ``block_expert`` names each
   row block's expert and ``num_padded`` (a device scalar) how many rows are in use.
2. ``_gate_up_kernel``, grid (row blocks, I tiles): gathers the block's token rows of ``x``,
   multiplies them by the expert's gate and up tiles at once and stores ``silu(g) * u`` into
   ``h [max_padded, I]``; blocks at or past ``num_padded`` exit at once, sentinel rows are skipped.
3. ``_down_kernel``, grid (row blocks, H tiles): ``h`` rows times ``w2[expert]``, scaled by each
   slot's float32 routing weight and stored at the slot's own row of ``y [T*K, H]`` float32 (each
   slot has one writer: no atomics, the result is deterministic); ``y.view(T, K, H).sum(1)``,
   or with a narrower ``out_dtype`` ``_combine_kernel``: the sum over k and the rounding at once.
Tile sizes are constexprs picked from ``T*K`` by ``_tile_configs`` (an untuned starting table).
Needs Triton; on CPU it runs only under ``TRITON_INTERPRET=1`` (the tests).

What does not belong here: routing, the path choice (``models/layers/moe.py``), prefill-sized
bf16 batches (``torch._grouped_mm`` runs them at the roofline).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kernels import dispatch
from kernels.moe_align import align_slots, align_slots_triton
from kernels.quant_fp8 import quant_fp8_per_token

try:  # optional: a CPU-only install may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

BLOCK_M = 16  # rows per block: the smallest tl.dot M, since a decode expert sees a few rows
# Larger batches keep the grouped GEMM: at 4096 slots each of 128 experts holds ~32 rows, where
# 16-row blocks still stream every weight tile about once (a block's neighbours share it in L2);
# past that the GEMMs turn compute-bound and 16-row mma tiles lose to grouped_mm's larger ones.
MAX_SLOTS = 4096
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP8_DTYPE = torch.float8_e4m3fn
FP8_ACT_BLOCK_M = 64  # rows per block with FP8 activations up to MAX_SLOTS: one wgmma M
# rows per block past MAX_SLOTS (FP8 prefill, either activation type): each weight tile feeds 8x
# decode's rows per read; the better of 64 and 128 in bench/moe_prefill_bench.py's sweeps at
# 8,192 tokens on an H200 for both W8A16 and W8A8
PREFILL_BLOCK_M = 128


class TileConfig(NamedTuple):
    block_n: int  # output columns per program (gate/up: columns of each of the two tiles)
    block_k: int  # reduction step
    num_stages: int  # software pipeline depth of the weight loads
    num_warps: int


def supported(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, num_slots: int, fp8: bool = False
) -> bool:
    """True when the kernels handle these operands: a decode-sized batch, or FP8 weights
    (``fp8``: codes with per-row scales) at any size."""
    if triton is None or x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        return False
    e, two_i, h = w13.shape
    if fp8:
        dtypes_ok = (
            x.dtype in (torch.bfloat16, torch.float16) and w13.dtype == w2.dtype == FP8_DTYPE
        )
    else:
        dtypes_ok = x.dtype in DTYPES and w13.dtype == w2.dtype == x.dtype
    return (
        dtypes_ok
        and x.shape[1] == h
        and two_i % 2 == 0
        and w2.shape == (e, h, two_i // 2)
        and w13.stride(-1) == 1
        and w2.stride(-1) == 1
        and 0 < num_slots
        and (fp8 or num_slots <= MAX_SLOTS)
    )


def _block_m(num_slots: int, fp8_act: bool = False) -> int:
    # decode: 16-row blocks (an expert sees a few rows), 64 with FP8 activations (one wgmma M);
    # prefill (FP8 only reaches here past MAX_SLOTS): PREFILL_BLOCK_M
    if num_slots > MAX_SLOTS:
        return PREFILL_BLOCK_M
    return FP8_ACT_BLOCK_M if fp8_act else BLOCK_M


def _tile_configs(
    num_slots: int, fp8: bool = False, fp8_act: bool = False
) -> tuple[TileConfig, TileConfig]:
    if fp8_act and num_slots > MAX_SLOTS:
        # bench/moe_prefill_bench.py's sweep at 8,192 tokens on an H200 (128-row blocks): 3.20
        # vs 3.85 ms for the choice below. Shared memory: gate/up stages 16 + 2 x 16 KiB per
        # step (x 4 = 192 KiB), down 16 + 32 KiB (x 4 = 192 KiB), within Hopper's 227 KiB.
        return TileConfig(128, 128, 4, 8), TileConfig(256, 128, 4, 8)
    if fp8_act:
        # NOTE: untuned, sized for Hopper: 64-row blocks (one warpgroup's wgmma M), 128-wide
        # e4m3 tiles with a 128-byte reduction step; gate/up stages 8 + 2 x 16 KiB per step
        # (x 3 = 120 KiB of shared memory), down 8 + 16 KiB (x 4 = 96 KiB).
        return TileConfig(128, 128, 3, 8), TileConfig(128, 128, 4, 4)
    # NOTE: a starting table (the decode rows measured on an H200, the rest not tuned). Decode is
    # weight-bandwidth bound, so what matters is enough programs in flight: a few row blocks need
    # narrow tiles to fill the SMs (a gate/up program already streams 2 * block_n weight rows).
    # (gate/up, down). FP8 codes are half the bytes: twice the reduction step per load.
    if num_slots <= 64:
        bk = 256 if fp8 else 128
        return TileConfig(32, bk, 4, 4), TileConfig(64, bk, 4, 4)
    if num_slots <= 1024:
        return TileConfig(64, 128, 3, 4), TileConfig(128, 128, 3, 4)
    if num_slots <= MAX_SLOTS:
        return TileConfig(128, 64, 3, 4), TileConfig(128, 64, 4, 4)
    return TileConfig(64, 64, 3, 8), TileConfig(128, 64, 4, 4)  # W8A16 prefill: swept, H200


def _fit(cfg: TileConfig, n: int, k: int) -> tuple[int, int]:  # (block_n, block_k)
    # tiles no wider than the problem (small test shapes); 16 is tl.dot's minimum
    block_n = min(cfg.block_n, max(16, triton.next_power_of_2(n)))
    return block_n, min(cfg.block_k, max(16, triton.next_power_of_2(k)))


def fused_experts(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E_local, 2I, H] x.dtype
    w2: torch.Tensor,  # [E_local, H, I] x.dtype
    route_weights: torch.Tensor,  # [T, K] float32
    route_ids: torch.Tensor,  # [T, K] int64 global expert ids
    expert_start: int = 0,
    foreign_slots: bool = True,  # False only when every routed id is a local expert
    edges: torch.Tensor | None = None,  # [E_local + 1] int64 0..E_local; past MAX_SLOTS only
    w13_scale: torch.Tensor | None = None,  # [E_local, 2I, 1] float32 with FP8 w13
    w2_scale: torch.Tensor | None = None,  # [E_local, H, 1] float32 with FP8 w2
    # FP8 weights only: True quantises x and h to e4m3 (W8A8) at any size; False keeps them in
    # x.dtype (W8A16); None: dispatch.FP8_ACTIVATIONS (default on) past MAX_SLOTS, else W8A16
    fp8_activations: bool | None = None,
    out_dtype: torch.dtype = torch.float32,  # the sum over k rounded once to this dtype
) -> torch.Tensor:  # [T, H] out_dtype
    t, k = route_ids.shape
    fp8 = w13_scale is not None
    if fp8_activations is None:
        fp8_activations = fp8 and dispatch.FP8_ACTIVATIONS and t * k > MAX_SLOTS
    if fp8_activations and not fp8:
        raise ValueError("fp8_activations needs FP8 weights with their scales")
    e, two_i, h = w13.shape
    inter = two_i // 2
    if triton is None:
        raise RuntimeError("the fused MoE kernels need triton")
    if t == 0:
        return torch.zeros(0, h, dtype=out_dtype, device=x.device)
    if not supported(x, w13, w2, t * k, fp8) or fp8 != (w2_scale is not None):
        raise ValueError(
            f"fused MoE: x {tuple(x.shape)} {x.dtype}, w13 {tuple(w13.shape)} {w13.dtype}, "
            f"w2 {tuple(w2.shape)} {w2.dtype}, {t * k} slots (one dtype and <= {MAX_SLOTS} "
            "slots, or FP8 codes with both scales)"
        )
    if fp8:
        s13, s2 = w13_scale.reshape(e, two_i), w2_scale.reshape(e, h)  # one scale per row
    else:
        s13, s2 = w13, w2  # never read (HAS_SCALE is off)
    if x.stride(1) != 1:
        x = x.contiguous()
    slots = t * k
    block_m = _block_m(slots, fp8_activations)
    if slots <= MAX_SLOTS:  # decode: one launch instead of ~15 small torch kernels
        aligned = align_slots_triton(route_ids, e, expert_start, block_m)
    else:
        aligned = align_slots(route_ids, e, expert_start, foreign_slots, edges, block_m)
    rows = aligned.sorted_slot_ids.numel()
    blocks = rows // block_m
    up_cfg, down_cfg = _tile_configs(slots, fp8, fp8_activations)
    # fp32 (the tests' exact path) must not round through TF32; half types take the default
    precision = "ieee" if x.dtype == torch.float32 else None
    x_in, x_scale = quant_fp8_per_token(x) if fp8_activations else (x, s13)  # [T, H], [T, 1]

    hidden_act = x.new_empty(rows, inter)  # [max_padded, I]; sentinel rows never written
    # row blocks on grid axis 0 (launched first): an expert's blocks run side by side, so each
    # weight tile comes from HBM once and the other blocks find it in L2
    bn, bk = _fit(up_cfg, inter, h)
    _gate_up_kernel[(blocks, triton.cdiv(inter, bn))](
        x_in, x_scale, w13, s13, hidden_act, aligned.sorted_slot_ids, aligned.block_expert,
        aligned.num_padded,
        slots, inter, h,
        x_in.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), hidden_act.stride(0),
        TOP_K=k, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=h % bk == 0, HAS_SCALE=fp8,
        ACT_SCALE=fp8_activations, PRECISION=precision,
        num_stages=up_cfg.num_stages, num_warps=up_cfg.num_warps,
    )  # fmt: skip
    # W8A8: h per slot row, [max_padded, I] e4m3 and [max_padded, 1] float32
    h_in, h_scale = quant_fp8_per_token(hidden_act) if fp8_activations else (hidden_act, s2)

    # every local slot gets its row written; foreign slots' rows must read as zero
    y = (torch.zeros if foreign_slots else torch.empty)(
        slots, h, dtype=torch.float32, device=x.device
    )  # [T*K, H]
    weights = route_weights.reshape(-1).contiguous()  # [T*K] float32
    bn, bk = _fit(down_cfg, h, inter)
    _down_kernel[(blocks, triton.cdiv(h, bn))](
        h_in, h_scale, w2, s2, y, weights, aligned.sorted_slot_ids, aligned.block_expert,
        aligned.num_padded,
        slots, h, inter,
        h_in.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=inter % bk == 0, HAS_SCALE=fp8,
        ACT_SCALE=fp8_activations, PRECISION=precision,
        num_stages=down_cfg.num_stages, num_warps=down_cfg.num_warps,
    )  # fmt: skip
    if out_dtype == torch.float32:
        return y.view(t, k, h).sum(1)
    # the sum over k and the rounding in one pass (torch would run a sum and a cast)
    out = torch.empty(t, h, dtype=out_dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(h))
    _combine_kernel[(t, triton.cdiv(h, block))](y, out, h, TOP_K=k, BLOCK=block)
    return out


if triton is not None:

    @triton.jit
    def _gate_up_kernel(
        x_ptr, xs_ptr, w_ptr, s_ptr, h_ptr, slot_ptr, block_expert_ptr, num_padded_ptr,
        num_slots, inter, hidden,
        stride_x, stride_we, stride_wn, stride_se, stride_h,
        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, HAS_SCALE: tl.constexpr,
        ACT_SCALE: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        block = tl.program_id(0)
        if block * BLOCK_M >= tl.load(num_padded_ptr):
            return
        expert = tl.load(block_expert_ptr + block).to(tl.int64)
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        slots = tl.load(slot_ptr + rows)  # [BLOCK_M] int64
        real = slots < num_slots
        tokens = slots // TOP_K
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        # wrapped columns keep the weight loads unmasked; the store drops them
        wcols = cols % inter
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + tokens[:, None] * stride_x + ks[None, :]  # [BLOCK_M, BLOCK_K]
        gate_ptrs = w_ptr + expert * stride_we + wcols[None, :] * stride_wn + ks[:, None]
        up_ptrs = gate_ptrs + inter * stride_wn  # up row n sits I rows below gate row n
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, tl.cdiv(hidden, BLOCK_K)):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=real[:, None], other=0.0)
                g = tl.load(gate_ptrs)
                u = tl.load(up_ptrs)
            else:
                left = hidden - kk * BLOCK_K
                a = tl.load(x_ptrs, mask=real[:, None] & (ks[None, :] < left), other=0.0)
                g = tl.load(gate_ptrs, mask=ks[:, None] < left, other=0.0)
                u = tl.load(up_ptrs, mask=ks[:, None] < left, other=0.0)
            # FP8 codes: widened to x's dtype for the tensor cores (W8A16), or kept as they are
            # when x is e4m3 too (W8A8: a no-op cast); the sums are scaled below
            if HAS_SCALE:
                g = g.to(a.dtype)
                u = u.to(a.dtype)
            acc_gate = tl.dot(a, g, acc_gate, input_precision=PRECISION)
            acc_up = tl.dot(a, u, acc_up, input_precision=PRECISION)
            x_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K
            up_ptrs += BLOCK_K
        if HAS_SCALE:
            scales = s_ptr + expert * stride_se + wcols
            acc_gate = acc_gate * tl.load(scales)[None, :]
            acc_up = acc_up * tl.load(scales + inter)[None, :]
        if ACT_SCALE:  # x_q rows: one float32 scale per token
            x_scale = tl.load(xs_ptr + tokens, mask=real, other=0.0)[:, None]
            acc_gate = acc_gate * x_scale
            acc_up = acc_up * x_scale
        act = acc_gate * tl.sigmoid(acc_gate) * acc_up  # silu(g) * u in float32, rounded once
        out_ptrs = h_ptr + rows[:, None] * stride_h + cols[None, :]
        keep = real[:, None] & (cols[None, :] < inter)
        tl.store(out_ptrs, act.to(h_ptr.dtype.element_ty), mask=keep)

    @triton.jit
    def _down_kernel(
        h_ptr, hs_ptr, w_ptr, s_ptr, y_ptr, route_w_ptr, slot_ptr, block_expert_ptr,
        num_padded_ptr,
        num_slots, hidden, inter,
        stride_h, stride_we, stride_wn, stride_se, stride_y,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr, HAS_SCALE: tl.constexpr, ACT_SCALE: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        block = tl.program_id(0)
        if block * BLOCK_M >= tl.load(num_padded_ptr):
            return
        expert = tl.load(block_expert_ptr + block).to(tl.int64)
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        slots = tl.load(slot_ptr + rows)  # [BLOCK_M] int64
        real = slots < num_slots
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        wcols = cols % hidden
        ks = tl.arange(0, BLOCK_K)
        # sentinel rows of h were never written: masked, so their garbage cannot be NaN here
        h_ptrs = h_ptr + rows[:, None] * stride_h + ks[None, :]  # [BLOCK_M, BLOCK_K]
        w_ptrs = w_ptr + expert * stride_we + wcols[None, :] * stride_wn + ks[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, tl.cdiv(inter, BLOCK_K)):
            if EVEN_K:
                a = tl.load(h_ptrs, mask=real[:, None], other=0.0)
                b = tl.load(w_ptrs)
            else:
                left = inter - kk * BLOCK_K
                a = tl.load(h_ptrs, mask=real[:, None] & (ks[None, :] < left), other=0.0)
                b = tl.load(w_ptrs, mask=ks[:, None] < left, other=0.0)
            if HAS_SCALE:
                b = b.to(a.dtype)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            h_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        weight = tl.load(route_w_ptr + slots, mask=real, other=0.0)  # [BLOCK_M] float32
        if ACT_SCALE:  # h_q rows: one float32 scale per slot row
            weight = weight * tl.load(hs_ptr + rows, mask=real, other=0.0)
        acc = acc * weight[:, None]
        if HAS_SCALE:
            acc = acc * tl.load(s_ptr + expert * stride_se + wcols)[None, :]
        out_ptrs = y_ptr + slots[:, None] * stride_y + cols[None, :]
        tl.store(out_ptrs, acc, mask=real[:, None] & (cols[None, :] < hidden))

    @triton.jit
    def _combine_kernel(y_ptr, out_ptr, hidden, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
        # out[t] = sum over k of y[t*K + k], added in k order in float32, rounded once
        tok = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = cols < hidden
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            acc += tl.load(y_ptr + (tok * TOP_K + j) * hidden + cols, mask=live, other=0.0)
        tl.store(out_ptr + tok * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=live)
