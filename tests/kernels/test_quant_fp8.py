"""Triton dynamic FP8 activation quantisation (per token, per 128-block) against torch.

On a GPU the kernels run compiled (FP8 needs sm_89+); on CPU under Triton's interpreter in a
fresh pytest process (``test_cases_pass_under_the_interpreter``). The interpreter's float32 ->
FP8 conversion rounds halves up and can lose the carry into the exponent, so on CPU the inputs
are built so that ``x / scale`` is exactly an e4m3 value (each row or block holds +-448 * s with
s a power of two): no rounding happens and any difference is a kernel error (scale, indexing,
masking, clamping). Random bf16 inputs at GLM-4.5V widths run on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import CAN_RUN, DEVICE, INTERPRETED, interpreter_test, kernel_case

pytest.importorskip("triton")


test_cases_pass_under_the_interpreter = interpreter_test(__file__)

if CAN_RUN:
    from kernels import quant_fp8 as kernel

FP8 = torch.float8_e4m3fn


def _fp8_supported() -> bool:
    return INTERPRETED or torch.cuda.get_device_capability() >= (8, 9)


def _exact_case(t: int, k: int, block: int, dtype, seed: int):
    """x [T, K] whose every ``block`` columns (or whole row) scale to exact e4m3 values."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (t, k), generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C  # no NaN codes
    q = codes.view(FP8).float()  # every finite e4m3 value, subnormals included
    starts = torch.arange(0, k, block)
    sign = torch.where(torch.rand(t, len(starts), generator=gen) < 0.5, -1.0, 1.0)
    q[:, starts] = 448.0 * sign  # each block reaches the e4m3 maximum
    s = 2.0 ** torch.randint(-12, 3, (t, 1), generator=gen).float()  # exact power-of-two scale
    x = q * s
    x[t // 2] = 0.0  # an all-zero row
    return x.to(DEVICE, dtype), q.to(DEVICE)


def _check_against(got, want, x: torch.Tensor) -> None:
    torch.testing.assert_close(got.scale, want.scale, rtol=0, atol=0)
    assert got.q.dtype == FP8 and got.q.shape == x.shape
    torch.testing.assert_close(got.q.float(), want.q.float(), rtol=0, atol=0)


@kernel_case
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_per_token_exact_values(dtype) -> None:
    x, q_true = _exact_case(6, 300, 300, dtype, seed=1)
    got = kernel.quant_fp8_per_token(x)
    _check_against(got, kernel.quant_fp8_per_token_reference(x), x)
    nonzero = x.float().abs().amax(1) > 0
    torch.testing.assert_close(got.q.float()[nonzero], q_true[nonzero], rtol=0, atol=0)
    assert (got.q.float()[~nonzero] == 0).all() and (got.scale > 0).all()


@kernel_case
@pytest.mark.parametrize(("k", "block"), [(256, 128), (300, 128), (96, 32)])
def test_per_block_exact_values(k: int, block: int) -> None:
    x, q_true = _exact_case(5, k, block, torch.float32, seed=k)
    got = kernel.quant_fp8_per_block(x, block)
    assert got.scale.shape == (5, -(-k // block))
    _check_against(got, kernel.quant_fp8_per_block_reference(x, block), x)
    nonzero = x.abs().amax(1) > 0
    torch.testing.assert_close(got.q.float()[nonzero], q_true[nonzero], rtol=0, atol=0)


@kernel_case
def test_rejects_bad_block() -> None:
    with pytest.raises(ValueError, match="power of two"):
        kernel.quant_fp8_per_block(torch.zeros(2, 96, device=DEVICE), 96)


def _assert_random_close(got, want, x: torch.Tensor) -> None:
    torch.testing.assert_close(got.scale, want.scale, rtol=1e-6, atol=0)
    # same scale, but the fp8 conversion of a value on a rounding boundary (and the sign of a
    # zero) may differ between Triton and torch: such a code is the neighbouring one
    a, b = got.q.float(), want.q.float()
    differ = a != b
    assert differ.float().mean().item() < 1e-2
    # one e4m3 step: at most 1/8 of a normal value; 2^-9 among subnormals and next to zero
    step = torch.clamp(b.abs() / 8, min=2**-9)
    assert ((a - b).abs()[differ] <= step[differ] * 1.01).all()
    torch.testing.assert_close(got.q.float(), want.q.float(), rtol=0.125, atol=2**-9)
    scale = got.scale  # [T, 1] broadcasts; [T, K/128] widens to one scale per column
    if scale.shape[1] > 1:
        scale = scale.repeat_interleave(128, dim=1)[:, : x.shape[1]]
    dequant = got.q.float() * scale
    assert ((dequant - x.float()).abs() <= x.float().abs() / 16 + scale * 2**-9).all()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 32, 256, 4096])
@pytest.mark.parametrize("k", [4096, 1408])
def test_bf16_glm45v_widths(tokens: int, k: int) -> None:
    if not _fp8_supported():
        pytest.skip("FP8 conversion needs sm_89+")
    gen = torch.Generator().manual_seed(tokens + k)
    x = (torch.randn(tokens, k, generator=gen) * 4).to("cuda", torch.bfloat16)
    x[:, 7] *= 50  # an outlier column, as activations have
    got = kernel.quant_fp8_per_token(x)
    assert got.scale.shape == (tokens, 1)
    _assert_random_close(got, kernel.quant_fp8_per_token_reference(x), x)
    got = kernel.quant_fp8_per_block(x, 128)
    assert got.scale.shape == (tokens, k // 128)
    _assert_random_close(got, kernel.quant_fp8_per_block_reference(x, 128), x)


@pytest.mark.gpu
def test_replays_in_a_cuda_graph() -> None:
    if not _fp8_supported():
        pytest.skip("FP8 conversion needs sm_89+")
    x = torch.randn(32, 4096, device="cuda", dtype=torch.bfloat16)
    kernel.quant_fp8_per_block(x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernel.quant_fp8_per_block(x)
    fresh = torch.randn(32, 4096, device="cuda", dtype=torch.bfloat16) * 3
    x.copy_(fresh)
    graph.replay()
    _assert_random_close(captured, kernel.quant_fp8_per_block_reference(fresh), fresh)
