"""FP8 (e4m3) weights with one float32 scale per output channel: storage, loading and GEMMs.

Contract: a weight ``w [..., N, K]`` is held as codes ``q`` (``float8_e4m3fn``, same shape) and
``scale [..., N, 1]`` float32 with ``w ~= q * scale``.
- ``quantize_per_channel(w) -> Fp8Weight``: ``scale = max(amax_row, AMAX_FLOOR) / 448``.
- ``Fp8LinearMethod().create_weights(layer)`` turns a ``ColumnParallelLinear`` (and subclasses) or
  ``RowParallelLinear`` into FP8: ``layer.weight`` becomes codes, ``layer.weight_scale [rows, 1]``
  is added, ``layer.quant_method`` is set so the layer's forward calls ``apply``. The weight's
  loader takes FP8 codes (sliced like the bf16 weight) or any float tensor (quantised per row
  first, its scale loaded alongside); the scale's loader slices like the output rows (column
  layers) or copies whole (row layers keep every output row).
- ``Fp8MoEMethod().create_weights(moe)`` does the same for ``FusedMoE``: ``w13_weight_scale
  [E, 2I, 1]``, ``w2_weight_scale [E, H, 1]``, sharded like the rows of their weights.
- ``fp8_linear(x, q, scale, bias)``: on CUDA, decode-sized batches (``kernels/fp8_gemv.py``'s
  ``MAX_ROWS``) run the W8A16 Triton kernel (codes widened in-kernel, activations unquantised);
  larger ones, when ``torch._scaled_mm`` with row-wise scales probes correct for the device and
  dtype, have their activations quantised per token
  (``kernels/quant_fp8.py``) and one FP8 GEMM runs; otherwise (CPU, older builds) the weight is
  dequantised to ``x.dtype`` and a plain GEMM runs.
- ``convert_to_fp8(module)`` applies both methods to every parallel linear and fused-expert layer
  inside ``module`` (the caller passes the text decoder only: embeddings, lm_head, norms, the
  router and the vision tower stay in high precision).
- ``random_fp8_(q, scale, std, generator)`` fills codes and scales from random normal weights,
  chunk by chunk (dummy weights without a high-precision copy of the model).

What does not belong here: whether a model runs in FP8 (loader.py), reading checkpoint files,
the activation quantisation kernels (kernels/quant_fp8.py), the grouped GEMM (kernels/).
"""

from __future__ import annotations

import functools
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kernels import fp8_gemv
from kernels.dispatch import triton_enabled
from kernels.quant_fp8 import (
    AMAX_FLOOR,
    FP8_DTYPE,
    FP8_MAX,
    Fp8Quant,
    quant_fp8_per_token,
    quant_fp8_per_token_reference,
)
from models.layers.linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    check_shape,
    default_weight_loader,
)

MIN_CAPABILITY = (8, 9)  # Ada / Hopper and newer have FP8 tensor cores


class Fp8Weight(NamedTuple):
    q: torch.Tensor  # [..., N, K] float8_e4m3fn
    scale: torch.Tensor  # [..., N, 1] float32; w ~= q * scale


def fp8_device_supported(device: torch.device) -> bool:
    """True on a CUDA device with FP8 tensor cores (compute capability >= 8.9)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def quantize_per_channel(w: torch.Tensor) -> Fp8Weight:  # w [..., N, K] any float dtype
    wf = w.float()
    scale = wf.abs().amax(-1, keepdim=True).clamp_min(AMAX_FLOOR) / FP8_MAX  # [..., N, 1]
    return Fp8Weight((wf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale)


def dequantize(
    q: torch.Tensor,  # [..., N, K] float8_e4m3fn
    scale: torch.Tensor,  # [..., N, 1] float32
    dtype: torch.dtype,
) -> torch.Tensor:  # [..., N, K] dtype
    return (q.float() * scale).to(dtype)


def quantize_activations(x: torch.Tensor) -> Fp8Quant:  # x [T, K] -> q [T, K], scale [T, 1]
    return quant_fp8_per_token(x) if triton_enabled(x) else quant_fp8_per_token_reference(x)


def fp8_linear(
    x: torch.Tensor,  # [T, K] bf16 / fp16 / fp32
    q: torch.Tensor,  # [N, K] float8_e4m3fn
    scale: torch.Tensor,  # [N, 1] float32
    bias: torch.Tensor | None = None,  # [N] x.dtype
) -> torch.Tensor:  # [T, N] x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if triton_enabled(x2) and fp8_gemv.supported(x2, q):
        y = fp8_gemv.w8a16_linear(x2, q, scale, bias)
    elif x2.shape[0] > 0 and scaled_mm_supported(x2, q):
        xq = quantize_activations(x2)
        # NOTE: bias is added separately: row-wise scaled GEMMs accept a bias only in some
        # builds and dtypes, and one elementwise add is cheap next to the GEMM.
        y = torch._scaled_mm(
            xq.q, q.t(), scale_a=xq.scale, scale_b=scale.view(1, -1), out_dtype=x.dtype
        )
        if bias is not None:
            y = y + bias
    else:
        y = F.linear(x2, dequantize(q, scale, x.dtype), bias)
    return y.reshape(*lead, q.shape[0])


def scaled_mm_supported(x: torch.Tensor, q: torch.Tensor) -> bool:
    """True when ``torch._scaled_mm`` (row-wise scales) runs correctly for these operands."""
    if not x.is_cuda or q.dtype != FP8_DTYPE or not hasattr(torch, "_scaled_mm"):
        return False
    if x.shape[-1] % 16 or q.shape[0] % 16 or q.stride(-1) != 1:
        return False
    return _probe_scaled_mm(x.device, x.dtype)


@functools.cache  # once per device and dtype
def _probe_scaled_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Run a tiny problem once; a build or GPU without a row-wise FP8 kernel raises."""
    # NOTE: synchronises the device; the first forward (warm-up, before any CUDA graph
    # capture) pays it, later calls read the cached answer. An odd row count is used on
    # purpose: decode batches have any size.
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(5, 64, generator=gen).to(device=device, dtype=dtype)
    w = quantize_per_channel(torch.randn(32, 64, generator=gen).to(device))
    xq = quant_fp8_per_token_reference(x)
    try:
        got = torch._scaled_mm(
            xq.q, w.q.t(), scale_a=xq.scale, scale_b=w.scale.view(1, -1), out_dtype=dtype
        )
    except (RuntimeError, NotImplementedError):
        return False
    want = (xq.q.float() * xq.scale) @ (w.q.float() * w.scale).t()
    # a kernel that runs but disagrees with the dequantised product is not used
    return bool(torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2))


def _param(t: torch.Tensor, loader) -> nn.Parameter:
    p = nn.Parameter(t, requires_grad=False)
    p.weight_loader = loader
    return p


class Fp8LinearMethod:
    """FP8 codes + per-output-row scales for a column- or row-parallel linear layer."""

    def create_weights(self, layer: ColumnParallelLinear | RowParallelLinear) -> None:
        w = layer.weight  # [rows, cols] per rank; may live on the meta device
        layer.weight = _param(
            torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device), partial(self._load, layer)
        )
        # row-parallel layers split the input columns only: every rank keeps all output rows
        scale_loader = (
            default_weight_loader if isinstance(layer, RowParallelLinear) else layer.weight_loader
        )
        scale = torch.empty(w.shape[0], 1, dtype=torch.float32, device=w.device)
        layer.weight_scale = _param(scale, scale_loader)
        layer.quant_method = self

    @staticmethod
    def _load(
        layer: ColumnParallelLinear | RowParallelLinear,
        param: torch.Tensor,
        loaded: torch.Tensor,
        shard_id: object = None,
    ) -> None:
        if loaded.dtype != FP8_DTYPE:
            # a high-precision checkpoint tensor (ignored by the checkpoint's quantisation, or
            # an unquantised checkpoint run in FP8): quantise the full rows, then shard both
            loaded, row_scale = quantize_per_channel(loaded.to(param.device))
            scale = layer.weight_scale
            scale.weight_loader(scale, row_scale, shard_id)
        layer.weight_loader(param, loaded, shard_id)

    def apply(
        self,
        layer: ColumnParallelLinear | RowParallelLinear,
        x: torch.Tensor,  # [T, in(/tp)]
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [T, out(/tp)]
        return fp8_linear(x, layer.weight, layer.weight_scale, bias)


class Fp8MoEMethod:
    """FP8 codes + per-output-row scales for the stacked routed experts of a ``FusedMoE``."""

    def create_weights(self, moe: nn.Module) -> None:
        for name in ("w13_weight", "w2_weight"):
            w = getattr(moe, name)  # [E_local, N, K]
            codes = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
            setattr(moe, name, _param(codes, partial(self._load, moe)))
            scale = torch.empty(*w.shape[:2], 1, dtype=torch.float32, device=w.device)
            setattr(moe, name + "_scale", _param(scale, partial(self._load_scale, moe)))
        moe.quant_method = self

    @classmethod
    def _load(
        cls, moe: nn.Module, param: torch.Tensor, loaded: torch.Tensor, shard_id: str, expert: int
    ) -> None:
        if loaded.dtype != FP8_DTYPE:
            loaded, row_scale = quantize_per_channel(loaded.to(param.device))
            scale = moe.w2_weight_scale if shard_id == "w2" else moe.w13_weight_scale
            cls._load_scale(moe, scale, row_scale, shard_id, expert)
        moe.weight_loader(param, loaded, shard_id, expert)

    @staticmethod
    def _load_scale(
        moe: nn.Module,
        param: torch.Tensor,  # [E_local, rows, 1] float32
        loaded: torch.Tensor,  # [rows_full, 1] (or [rows_full]) one checkpoint expert's scale
        shard_id: str,
        expert: int,
    ) -> None:
        """Same placement as ``FusedMoE.weight_loader`` for the rows of the matching weight:
        gate/up rows are sliced by TP, the down projection's rows (hidden) are kept whole."""
        rows = moe.hidden_size if shard_id == "w2" else moe.intermediate_size
        loaded = loaded.reshape(-1, 1) if loaded.dim() == 1 else loaded
        check_shape(loaded, (rows, 1))
        moe.place_expert(param, loaded, shard_id, expert, slice_down=False)


def convert_to_fp8(module: nn.Module) -> None:
    """FP8 weights for every parallel linear and fused-expert layer inside ``module``."""
    from models.layers.moe import FusedMoE  # moe.py imports this module

    linear, experts = Fp8LinearMethod(), Fp8MoEMethod()
    for m in list(module.modules()):
        if isinstance(m, ColumnParallelLinear | RowParallelLinear):
            linear.create_weights(m)
        elif isinstance(m, FusedMoE):
            experts.create_weights(m)


@torch.no_grad()
def random_fp8_(
    q: torch.Tensor,  # [..., N, K] float8_e4m3fn, filled in place
    scale: torch.Tensor,  # [..., N, 1] float32, filled in place
    std: float,
    generator: torch.Generator,
    chunk_elems: int = 1 << 25,
) -> None:
    """Codes and scales of N(0, std) weights, drawn in bf16 a chunk of rows at a time, so the
    high-precision model never exists (a real-size layer needs ~64 MiB of scratch)."""
    k = q.shape[-1]
    codes, scales = q.view(-1, k), scale.view(-1, 1)
    rows = max(1, min(codes.shape[0], chunk_elems // k))
    buf = torch.empty(rows, k, dtype=torch.bfloat16, device=q.device)
    for start in range(0, codes.shape[0], rows):
        n = min(rows, codes.shape[0] - start)
        chunk = quantize_per_channel(buf[:n].normal_(0.0, std, generator=generator))
        codes[start : start + n].copy_(chunk.q)
        scales[start : start + n].copy_(chunk.scale)
