"""Triton partial NeoX rotary against the torch reference, and the M-RoPE layer's ``apply_``.

On a GPU the kernel runs compiled; on CPU under Triton's interpreter in a fresh pytest process
(``test_cases_pass_under_the_interpreter``: the variable must be set before Triton is imported).
The interpreter rounds float32 -> bfloat16 by truncation, so CPU covers float32 and float16
(where the kernel must match the reference bit for bit); bfloat16 at GLM-4.5V's head layout
(96 q + 8 kv heads of 128, rotary dim 64, rotated inside a fused qkv row) runs on the GPU.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import CAN_RUN, DEVICE, interpreter_test, kernel_case

from kernels import dispatch
from models.layers.rotary import MRotaryEmbedding

pytest.importorskip("triton")


test_cases_pass_under_the_interpreter = interpreter_test(__file__)

if CAN_RUN:
    from kernels import rotary as kernel


def _qkv_and_rope(t: int, hq: int, hk: int, d: int, rotary_dim: int, dtype, device, seed: int):
    """A fused qkv buffer [T, Hq + 2Hk, D] and M-RoPE cos/sin for random 3-D positions."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, hq + 2 * hk, d, generator=gen).to(device, dtype)
    half = rotary_dim // 2
    section = (half - 2 * (half // 3), half // 3, half // 3)  # t, h, w frequency counts
    rope_layer = MRotaryEmbedding(d, rotary_dim, 10000.0, section).to(device)
    positions = torch.randint(0, 5000, (3, t), generator=gen).to(device)
    return qkv, rope_layer, rope_layer(positions, dtype)


@kernel_case
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("t", "hq", "hk", "d", "rotary_dim"), [(1, 4, 2, 32, 16), (9, 20, 3, 16, 12)]
)
def test_rotates_qk_view_like_reference(t, hq, hk, d, rotary_dim, dtype) -> None:
    qkv, _, rope = _qkv_and_rope(t, hq, hk, d, rotary_dim, dtype, DEVICE, seed=t + hq)
    want = qkv.clone()
    kernel.rotary_reference_(want[:, : hq + hk], rope.cos, rope.sin, rotary_dim)
    original = qkv.clone()
    kernel.rotary_(qkv[:, : hq + hk], rope.cos, rope.sin, rotary_dim)  # a strided view
    assert torch.equal(qkv, want)  # also: pass-through dims and v untouched
    assert not torch.equal(qkv, original)


@kernel_case
def test_rejects_cos_in_another_dtype() -> None:
    qkv, _, rope = _qkv_and_rope(2, 4, 2, 32, 16, torch.float16, DEVICE, seed=1)
    assert not kernel.supported(qkv, rope.cos.float(), 16)
    with pytest.raises(ValueError, match="x's dtype"):
        kernel.rotary_(qkv, rope.cos.float(), rope.sin.float(), 16)


def _assert_bf16_rotated(got: torch.Tensor, before: torch.Tensor, cos, sin) -> None:
    """``got`` [T, 112, 128] is ``before`` with q and k (the first 104 heads) rotated on their
    first 64 dims. Checked against the rotation done in fp32 from the same bf16 operands, to
    within three bf16 roundings of the products (torch's per-op rounding and a fused kernel
    differ by about that, and a sign, dim or position bug is off by O(1)); the other half of
    each head and v must be untouched."""
    x1, x2 = before[:, :104, :32].float(), before[:, :104, 32:64].float()
    c, s = cos.float(), sin.float()
    exact = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    bound = 2**-7 * torch.cat(
        [(x1 * c).abs() + (x2 * s).abs(), (x2 * c).abs() + (x1 * s).abs()], -1
    )
    err = (got[:, :104, :64].float() - exact).abs()
    assert (err <= bound + 1e-6).all(), f"max error over bound {(err - bound).max().item():.3g}"
    assert torch.equal(got[:, :104, 64:], before[:, :104, 64:])
    assert torch.equal(got[:, 104:], before[:, 104:])


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 32, 4096])
def test_bf16_glm45v_heads(tokens: int) -> None:
    qkv, _, rope = _qkv_and_rope(tokens, 96, 8, 128, 64, torch.bfloat16, "cuda", seed=tokens)
    before = qkv.clone()
    kernel.rotary_(qkv[:, :104], rope.cos, rope.sin, 64)
    _assert_bf16_rotated(qkv, before, rope.cos, rope.sin)
    want = before.clone()  # the torch reference meets the same bound
    kernel.rotary_reference_(want[:, :104], rope.cos, rope.sin, 64)
    _assert_bf16_rotated(want, before, rope.cos, rope.sin)


@pytest.mark.gpu
def test_replays_in_a_cuda_graph() -> None:
    qkv, _, rope = _qkv_and_rope(32, 96, 8, 128, 64, torch.bfloat16, "cuda", seed=2)
    kernel.rotary_(qkv.clone()[:, :104], rope.cos, rope.sin, 64)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel.rotary_(qkv[:, :104], rope.cos, rope.sin, 64)
    fresh, _, fresh_rope = _qkv_and_rope(32, 96, 8, 128, 64, torch.bfloat16, "cuda", seed=3)
    qkv.copy_(fresh)
    rope.cos.copy_(fresh_rope.cos)
    rope.sin.copy_(fresh_rope.sin)
    graph.replay()
    _assert_bf16_rotated(qkv, fresh, fresh_rope.cos, fresh_rope.sin)


@pytest.mark.gpu
def test_layer_agrees_with_triton_on_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    qkv, layer, rope = _qkv_and_rope(64, 96, 8, 128, 64, torch.bfloat16, "cuda", seed=4)
    calls = []
    real = kernel.rotary_
    monkeypatch.setattr(kernel, "rotary_", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(dispatch, "TRITON_DISABLED", False)
    on = qkv.clone()
    layer.apply_(on[:, :104], rope)
    assert calls, "the layer did not take the kernel on CUDA"
    monkeypatch.setattr(dispatch, "TRITON_DISABLED", True)
    calls.clear()
    off = qkv.clone()
    layer.apply_(off[:, :104], rope)
    assert not calls
    _assert_bf16_rotated(on, qkv, rope.cos, rope.sin)
    _assert_bf16_rotated(off, qkv, rope.cos, rope.sin)


@kernel_case
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_float32_variant_rounds_once_like_the_vision_reference(dtype) -> None:
    # the vision tower's layout: q|k heads of a fused qkv row, rotary over the whole head
    t, h, d = 7, 3, 32
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(t, 3 * h, d, generator=gen).to(DEVICE, dtype)
    angles = torch.rand(t, 1, d // 2, generator=gen).to(DEVICE) * 50
    cos, sin = angles.cos(), angles.sin()
    want = qkv.clone()
    kernel.rotary_f32_reference_(want[:, : 2 * h], cos, sin, d)
    # the reference is transformers' formula: x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)
    full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    x = qkv[:, : 2 * h].float()
    half = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), -1)
    torch.testing.assert_close(want[:, : 2 * h], (x * full_cos + half * full_sin).to(dtype))
    kernel.rotary_f32_(qkv[:, : 2 * h], cos, sin, d)
    torch.testing.assert_close(qkv, want, rtol=0, atol=torch.finfo(dtype).eps * 8)
    assert torch.equal(qkv[:, 2 * h :], want[:, 2 * h :])  # v untouched
    assert not kernel.supported(qkv, cos.to(dtype), d, f32=True) or dtype == torch.float32
