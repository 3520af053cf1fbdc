"""Triton ``silu(gate) * up`` against the torch ops, and the activation layer that picks it.

On a GPU the kernel runs compiled; on CPU under Triton's interpreter in a fresh pytest process
(``test_cases_pass_under_the_interpreter``). The interpreter rounds float32 -> bfloat16 by
truncation, so CPU covers float32 and float16; bfloat16 runs on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import CAN_RUN, DEVICE, interpreter_test, kernel_case

pytest.importorskip("triton")

test_cases_pass_under_the_interpreter = interpreter_test(__file__)

if CAN_RUN:
    from kernels import silu_mul as kernel

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@kernel_case
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("m", "n"), [(1, 8), (5, 1000), (3, 2500)])
def test_halves_of_a_fused_buffer_match_torch(m, n, dtype) -> None:
    gen = torch.Generator().manual_seed(m * n)
    fused = (torch.randn(m, 2 * n, generator=gen) * 3).to(DEVICE, dtype)
    gate, up = fused[:, :n], fused[:, n:]  # strided views of one buffer
    got = kernel.silu_mul(gate, up)
    want = kernel.silu_mul_reference(gate, up)
    assert got.shape == (m, n) and got.is_contiguous()
    # exp may differ in its last float32 bits, which can move a rounding step of the dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got, want, rtol=4 * eps, atol=eps * 1e-2)
    assert (got != 0).any()


@kernel_case
def test_separate_tensors_and_empty_rows() -> None:
    gate = torch.randn(4, 64, device=DEVICE)
    up = torch.randn(4, 64, device=DEVICE)
    torch.testing.assert_close(kernel.silu_mul(gate, up), kernel.silu_mul_reference(gate, up))
    assert kernel.silu_mul(gate[:0], up[:0]).shape == (0, 64)


@kernel_case
def test_rejects_mismatched_operands() -> None:
    gate = torch.randn(4, 64, device=DEVICE)
    assert not kernel.supported(gate, gate.half())
    assert not kernel.supported(gate, gate[:, :32])
    assert not kernel.supported(gate.t(), gate.t())  # last dim not contiguous
    with pytest.raises(ValueError, match="same shape and dtype"):
        kernel.silu_mul(gate, gate.half())


@kernel_case
def test_layer_uses_the_kernel_on_the_fused_output(monkeypatch) -> None:
    from kernels import dispatch
    from models.layers import activation

    calls = []
    real = kernel.silu_mul
    monkeypatch.setattr(kernel, "silu_mul", lambda g, u: calls.append(g.shape) or real(g, u))
    monkeypatch.setattr(dispatch, "triton_enabled", lambda t: True)
    monkeypatch.setattr(activation, "triton_enabled", lambda t: True)
    x = torch.randn(2, 3, 2 * 40, device=DEVICE)
    got = activation.silu_and_mul(x)
    assert calls == [torch.Size([6, 40])]
    torch.testing.assert_close(got, torch.nn.functional.silu(x[..., :40]) * x[..., 40:])
