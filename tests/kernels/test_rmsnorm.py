"""Triton RMSNorm / fused residual-add RMSNorm against the torch reference, and the norm layer.

On a GPU the kernel runs compiled. On CPU it runs under Triton's interpreter, which must be on
(``TRITON_INTERPRET=1``) before Triton is first imported, so
``test_cases_pass_under_the_interpreter`` re-runs this file in a fresh pytest process with the
variable set. The interpreter rounds float32 -> bfloat16 by truncation, so CPU covers float32 and
float16; bfloat16 at GLM-4.5V's hidden size runs in the GPU tests.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import CAN_RUN, DEVICE, interpreter_test, kernel_case

from kernels import dispatch
from models.layers.norm import RMSNorm

pytest.importorskip("triton")


test_cases_pass_under_the_interpreter = interpreter_test(__file__)

if CAN_RUN:
    from kernels import rmsnorm as kernel


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(device, dtype)
    residual = torch.randn(shape, generator=gen).to(device, dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(device, dtype)
    return x, residual, weight


def _assert_norm_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    # the float32 sum order may move the normalised value by one step of the io dtype before
    # the weight multiply; everything else is the same sequence of roundings
    step = {torch.float32: 1e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * step, atol=1e-6)
    if dtype != torch.float32:  # one-step flips of a half-precision value stay rare
        assert (got != want).float().mean().item() < 0.01


@kernel_case
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (5, 96), (2, 3, 200)])
def test_rms_norm_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x, _, weight = _inputs(shape, dtype, DEVICE, seed=shape[-1])
    got = kernel.rms_norm(x, weight, 1e-5)
    assert got.shape == x.shape and got.dtype == dtype
    _assert_norm_close(got, kernel.rms_norm_reference(x, weight, 1e-5), dtype)


@kernel_case
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rms_norm_matches_reference_and_leaves_inputs(dtype: torch.dtype) -> None:
    x, residual, weight = _inputs((7, 160), dtype, DEVICE, seed=7)
    x_before, res_before = x.clone(), residual.clone()
    got = kernel.add_rms_norm(x, residual, weight, 1e-6)
    want = kernel.add_rms_norm_reference(x, residual, weight, 1e-6)
    assert torch.equal(got.residual, want.residual)  # the add rounds exactly like torch's
    _assert_norm_close(got.out, want.out, dtype)
    assert torch.equal(x, x_before) and torch.equal(residual, res_before)


@kernel_case
def test_eps_counts_for_small_rows() -> None:
    x, _, weight = _inputs((4, 128), torch.float32, DEVICE, seed=2)
    x = x * 1e-3  # mean square ~1e-5: eps is as large as the signal
    got = kernel.rms_norm(x, weight, 1e-5)
    _assert_norm_close(got, kernel.rms_norm_reference(x, weight, 1e-5), torch.float32)
    assert not torch.allclose(got, kernel.rms_norm_reference(x, weight, 1e-7), rtol=1e-3)


@kernel_case
def test_strided_rows_are_read_in_place() -> None:
    x, _, weight = _inputs((6, 256), torch.float32, DEVICE, seed=3)
    view = x[:, :128]  # rows 256 apart, not contiguous
    got = kernel.rms_norm(view, weight[:128], 1e-5)
    _assert_norm_close(got, kernel.rms_norm_reference(view, weight[:128], 1e-5), torch.float32)


@kernel_case
def test_rejects_mixed_dtypes() -> None:
    x, _, weight = _inputs((2, 64), torch.float16, DEVICE, seed=1)
    assert not kernel.supported(x, weight.float())
    with pytest.raises(ValueError, match="same dtype"):
        kernel.rms_norm(x, weight.float(), 1e-5)


def test_layer_add_forward_is_the_add_then_the_norm() -> None:
    x, residual, weight = _inputs((3, 64), torch.bfloat16, "cpu", seed=8)
    norm = RMSNorm(64, 1e-5, dtype=torch.bfloat16)
    norm.weight.data.copy_(weight)
    got = norm.add_forward(x, residual)
    h = x + residual
    assert torch.equal(got.residual, h) and torch.equal(got.out, norm(h))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 32, 4096])
def test_bf16_glm45v_hidden(tokens: int) -> None:
    x, residual, weight = _inputs((tokens, 4096), torch.bfloat16, "cuda", seed=tokens)
    _assert_norm_close(
        kernel.rms_norm(x, weight, 1e-5), kernel.rms_norm_reference(x, weight, 1e-5), x.dtype
    )
    got = kernel.add_rms_norm(x, residual, weight, 1e-5)
    want = kernel.add_rms_norm_reference(x, residual, weight, 1e-5)
    assert torch.equal(got.residual, want.residual)
    _assert_norm_close(got.out, want.out, x.dtype)


@pytest.mark.gpu
def test_replays_in_a_cuda_graph() -> None:
    x, residual, weight = _inputs((32, 4096), torch.bfloat16, "cuda", seed=11)
    kernel.add_rms_norm(x, residual, weight, 1e-5)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernel.add_rms_norm(x, residual, weight, 1e-5)
    fresh, fresh_res, _ = _inputs((32, 4096), torch.bfloat16, "cuda", seed=12)
    x.copy_(fresh)
    residual.copy_(fresh_res)
    graph.replay()
    want = kernel.add_rms_norm_reference(fresh, fresh_res, weight, 1e-5)
    assert torch.equal(captured.residual, want.residual)
    _assert_norm_close(captured.out, want.out, torch.bfloat16)


@pytest.mark.gpu
def test_layer_agrees_with_triton_on_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    x, residual, weight = _inputs((64, 4096), torch.bfloat16, "cuda", seed=5)
    norm = RMSNorm(4096, 1e-5, dtype=torch.bfloat16).cuda()
    norm.weight.data.copy_(weight)
    calls = []
    real = kernel.rms_norm
    monkeypatch.setattr(kernel, "rms_norm", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(dispatch, "TRITON_DISABLED", False)
    on, on_add = norm(x), norm.add_forward(x, residual)
    assert calls, "the layer did not take the kernel on CUDA"
    monkeypatch.setattr(dispatch, "TRITON_DISABLED", True)
    calls.clear()
    off, off_add = norm(x), norm.add_forward(x, residual)
    assert not calls
    _assert_norm_close(on, off, torch.bfloat16)
    _assert_norm_close(on_add.out, off_add.out, torch.bfloat16)
    assert torch.equal(on_add.residual, off_add.residual)
