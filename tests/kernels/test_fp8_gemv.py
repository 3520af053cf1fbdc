"""W8A16 decode GEMM (FP8 codes, per-row scales, unquantised activations) against the torch
definition. Compiled on a GPU; on CPU under Triton's interpreter in a fresh pytest process. The
interpreter multiplies bfloat16 tiles as raw bits, so CPU covers float16; bfloat16 runs on GPU.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import CAN_RUN, DEVICE, interpreter_test, kernel_case

pytest.importorskip("triton")

test_cases_pass_under_the_interpreter = interpreter_test(__file__)

if CAN_RUN:
    from kernels import fp8_gemv as kernel
    from models.layers.fp8 import quantize_per_channel

DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _operands(m: int, n: int, k: int, dtype, seed: int, bias: bool):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / k**0.5
    q, scale = quantize_per_channel(w.to(DEVICE))
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    return x, q, scale, b


@kernel_case
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n", "k", "bias"), [(1, 48, 64, False), (5, 40, 300, True)])
def test_matches_dequantised_gemm(m, n, k, bias, dtype) -> None:
    x, q, scale, b = _operands(m, n, k, dtype, seed=m + n, bias=bias)
    got = kernel.w8a16_linear(x, q, scale, b)
    want = kernel.w8a16_reference(x, q, scale, b)
    assert got.shape == (m, n) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    assert want.abs().max() > 0.1


@kernel_case
@pytest.mark.parametrize(("split", "k"), [(2, 300), (3, 256), (4, 64), (8, 100)])
def test_split_k_matches_the_single_split(split: int, k: int) -> None:
    # more splits than K steps are clipped; uneven last steps are masked
    x, q, scale, b = _operands(3, 40, k, torch.float16, seed=split, bias=True)
    one = kernel.w8a16_linear(x, q, scale, b, tiles=(32, 32, 4, 2, 1))
    got = kernel.w8a16_linear(x, q, scale, b, tiles=(32, 32, 4, 2, split))
    torch.testing.assert_close(got.float(), one.float(), rtol=1e-3, atol=1e-3)
    want = kernel.w8a16_reference(x, q, scale, b)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@kernel_case
def test_supported_keeps_large_batches_and_other_dtypes_away() -> None:
    x, q, scale, _ = _operands(2, 32, 64, torch.float16, seed=0, bias=False)
    assert kernel.supported(x, q)
    assert not kernel.supported(x.float(), q)
    assert not kernel.supported(x.repeat(kernel.MAX_ROWS, 1), q)  # 64 rows: compute bound
    assert not kernel.supported(x, q.to(torch.float16))
    with pytest.raises(ValueError, match="FP8 codes"):
        kernel.w8a16_linear(x.float(), q, scale)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 17, 32])
def test_glm_projection_widths_on_gpu(m: int) -> None:
    x, q, scale, b = _operands(m, 14336, 4096, torch.bfloat16, seed=m, bias=True)
    got = kernel.w8a16_linear(x, q, scale, b)
    torch.testing.assert_close(got, kernel.w8a16_reference(x, q, scale, b), rtol=2e-2, atol=2e-2)
    # the attention output projection's shape, split along its long K
    x, q, scale, _ = _operands(m, 4096, 12288, torch.bfloat16, seed=m, bias=False)
    got = kernel.w8a16_linear(x, q, scale, tiles=(32, 256, 4, 3, 4))
    torch.testing.assert_close(got, kernel.w8a16_reference(x, q, scale), rtol=2e-2, atol=2e-2)
