"""Grouped GEMM over contiguous row blocks: the expert matmuls of a routed MoE layer.

Contract: ``grouped_mm(x, w, offs)`` multiplies rows ``offs[g-1]:offs[g]`` of ``x [M, K]`` by
``w[g].T`` where ``w [G, N, K]`` is stored like ``nn.Linear`` weights (out x in), and returns
``[M, N]`` in ``x.dtype``. ``offs [G]`` int32 holds the cumulative *end* row of each group (group 0
starts at row 0; empty groups repeat the previous end). Rows at or after ``offs[-1]`` are
unspecified: callers that park rows there (e.g. slots routed to another rank) must mask them.

Backends: on CUDA, ``torch._grouped_mm`` when this torch build runs it for the device and dtype
(probed once per device and dtype on a tiny problem) and the operands meet its 16-byte alignment;
otherwise ``grouped_mm_reference``: one dense GEMM per non-empty group on a slice of ``x``. CPU
takes the reference by default because per-group BLAS calls beat the CPU build of
``torch._grouped_mm`` (see bench/layers_bench.py); ``use_fused=True`` still forces it. The
reference reads the offsets on the host, so it synchronises a CUDA stream; the fused path does not
(it can be captured in a CUDA graph).

FP8 variant: ``scaled_grouped_mm(x, w, w_scale, offs)`` with ``w [G, N, K]`` float8_e4m3fn codes
and ``w_scale [G, N, 1]`` float32 (one scale per output row of each group) returns
``[M, N] x.dtype``. On CUDA, when ``torch._scaled_grouped_mm`` probes correct (per device and
dtype, like the bf16 probe), ``x`` is quantised per row (``kernels/quant_fp8.py``) and one FP8
grouped GEMM runs with row-wise scales; otherwise ``scaled_grouped_mm_reference`` dequantises each
non-empty group's weight to ``x.dtype`` and runs a dense GEMM on the unquantised rows.

What does not belong here: routing, the token permutation, the activation, the weighted combine.
"""

from __future__ import annotations

import functools

import torch

from kernels.dispatch import triton_enabled
from kernels.quant_fp8 import FP8_DTYPE, quant_fp8_per_token, quant_fp8_per_token_reference


def grouped_mm(
    x: torch.Tensor,  # [M, K]
    w: torch.Tensor,  # [G, N, K]
    offs: torch.Tensor,  # [G] int32, cumulative end row of each group
    use_fused: bool | None = None,  # None = pick; False forces the reference loop
) -> torch.Tensor:  # [M, N] x.dtype
    if use_fused is None:
        use_fused = fused_supported(x, w)
    if not use_fused:
        return grouped_mm_reference(x, w, offs)
    return torch._grouped_mm(x.contiguous(), w.transpose(-2, -1), offs=offs.to(torch.int32))


def grouped_mm_reference(
    x: torch.Tensor,  # [M, K]
    w: torch.Tensor,  # [G, N, K]
    offs: torch.Tensor,  # [G] int32
) -> torch.Tensor:  # [M, N] x.dtype; rows past offs[-1] left uninitialised
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            torch.matmul(x[start:end], w[g].t(), out=out[start:end])
        start = end
    return out


def fused_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """True when ``torch._grouped_mm`` is the better choice for these CUDA operands."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.device != w.device:
        return False
    if not x.is_cuda or not _cuda_aligned(x, w):
        return False
    return _probe(x.device, x.dtype)


def _cuda_aligned(x: torch.Tensor, w: torch.Tensor) -> bool:
    # CUTLASS grouped kernels need 16-byte aligned rows and base pointers.
    size = x.element_size()
    dims_ok = (x.shape[1] * size) % 16 == 0 and (w.shape[1] * size) % 16 == 0
    ptrs_ok = x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
    return dims_ok and ptrs_ok and w.stride(-1) == 1 and w.stride(-2) == w.shape[-1]


@functools.cache  # once per device and dtype
def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    """Run a tiny aligned problem once; a build without a kernel for it raises."""
    # NOTE: this synchronises the device; the first forward (warm-up, before any CUDA graph
    # capture) pays it, later calls only read the cached answer.
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(16, 32, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(2, 16, 32, generator=gen).to(device=device, dtype=dtype)
    offs = torch.tensor([8, 16], dtype=torch.int32, device=device)
    try:
        got = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    except (RuntimeError, NotImplementedError):
        return False
    want = grouped_mm_reference(x, w, offs)
    # a kernel that runs but disagrees with dense GEMMs is not used
    return bool(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2))


def scaled_grouped_mm(
    x: torch.Tensor,  # [M, K] bf16
    w: torch.Tensor,  # [G, N, K] float8_e4m3fn
    w_scale: torch.Tensor,  # [G, N, 1] float32
    offs: torch.Tensor,  # [G] int32, cumulative end row of each group
    use_fused: bool | None = None,  # None = pick; False forces the reference loop
) -> torch.Tensor:  # [M, N] x.dtype
    if use_fused is None:
        use_fused = scaled_fused_supported(x, w)
    if not use_fused:
        return scaled_grouped_mm_reference(x, w, w_scale, offs)
    quant = quant_fp8_per_token if triton_enabled(x) else quant_fp8_per_token_reference
    xq = quant(x)
    g, n = w.shape[0], w.shape[1]
    return torch._scaled_grouped_mm(
        xq.q,
        w.transpose(-2, -1),
        xq.scale.view(-1),
        w_scale.view(g, n),
        offs=offs.to(torch.int32),
        out_dtype=x.dtype,
    )


def scaled_grouped_mm_reference(
    x: torch.Tensor,  # [M, K]
    w: torch.Tensor,  # [G, N, K] float8_e4m3fn
    w_scale: torch.Tensor,  # [G, N, 1] float32
    offs: torch.Tensor,  # [G] int32
) -> torch.Tensor:  # [M, N] x.dtype; rows past offs[-1] left uninitialised
    out = x.new_empty(x.shape[0], w.shape[1])
    start = 0
    for g, end in enumerate(offs.tolist()):
        if end > start:
            wg = (w[g].float() * w_scale[g]).to(x.dtype)  # one group's weight at a time
            torch.matmul(x[start:end], wg.t(), out=out[start:end])
        start = end
    return out


def scaled_fused_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """True when ``torch._scaled_grouped_mm`` runs correctly for these CUDA operands."""
    if not hasattr(torch, "_scaled_grouped_mm") or w.dtype != FP8_DTYPE:
        return False
    if not x.is_cuda or x.device != w.device or x.dtype != torch.bfloat16:
        return False
    # FP8 rows of K and N bytes must be 16-byte aligned; the codes are stacked contiguously
    if x.shape[1] % 16 or w.shape[1] % 16 or not w.is_contiguous():
        return False
    return _probe_scaled(x.device, x.dtype)


@functools.cache  # once per device and dtype
def _probe_scaled(device: torch.device, dtype: torch.dtype) -> bool:
    """Run a tiny problem with uneven groups once; a GPU or build without the kernel raises."""
    # NOTE: synchronises the device, once, during the warm-up forward (before graph capture).
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(21, 64, generator=gen).to(device=device, dtype=dtype)
    wf = torch.randn(3, 32, 64, generator=gen).to(device)
    w_scale = wf.abs().amax(-1, keepdim=True) / torch.finfo(FP8_DTYPE).max  # [3, 32, 1]
    w = (wf / w_scale).clamp(-448.0, 448.0).to(FP8_DTYPE)
    offs = torch.tensor([5, 5, 21], dtype=torch.int32, device=device)  # one empty group
    xq = quant_fp8_per_token_reference(x)
    try:
        got = torch._scaled_grouped_mm(
            xq.q, w.transpose(-2, -1), xq.scale.view(-1), w_scale.view(3, 32), offs=offs,
            out_dtype=dtype,
        )  # fmt: skip
    except (RuntimeError, NotImplementedError):
        return False
    x_deq = (xq.q.float() * xq.scale).to(dtype)  # the activations the kernel saw
    want = scaled_grouped_mm_reference(x_deq, w, w_scale, offs)
    # a kernel that runs but disagrees with dense GEMMs is not used
    return bool(torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2))
