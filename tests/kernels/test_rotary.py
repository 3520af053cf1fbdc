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
from triton_interpreter import CAN_RUN, DEVICE, INTERPRETED, interpreter_test, kernel_case

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


def _caches(slots_total: int, hk: int, d: int, dtype, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(slots_total, hk, d, generator=gen).to(device, dtype)
    return k, torch.randn(slots_total, hk, d, generator=gen).to(device, dtype)


def _fused_vs_reference(t, hq, hk, d, rotary_dim, dtype, device, seed):
    """(kernel's qkv, k cache, v cache) and the reference's, from the same inputs."""
    qkv, _, rope = _qkv_and_rope(t, hq, hk, d, rotary_dim, dtype, device, seed=seed)
    k_cache, v_cache = _caches(3 * t + 5, hk, d, dtype, device, seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    slots = torch.randperm(3 * t + 5, generator=gen)[:t].to(device)  # distinct rows, any order
    want = [qkv.clone(), k_cache.clone(), v_cache.clone()]
    kernel.rotary_cache_reference_(want[0], hq, rope.cos, rope.sin, rotary_dim, *want[1:], slots)
    got = [qkv, k_cache, v_cache]
    kernel.rotary_cache_(qkv, hq, rope.cos, rope.sin, rotary_dim, k_cache, v_cache, slots)
    return got, want


@kernel_case
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("t", "hq", "hk", "d", "rotary_dim"),
    [(1, 4, 2, 32, 16), (9, 20, 3, 16, 12), (5, 12, 1, 32, 32), (3, 2, 1, 64, 8)],
)
def test_rotary_and_cache_write_match_the_unfused_ops(t, hq, hk, d, rotary_dim, dtype) -> None:
    got, want = _fused_vs_reference(t, hq, hk, d, rotary_dim, dtype, DEVICE, seed=t * hq + d)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)  # rotated q/k, v untouched; cached rows; other rows kept


@kernel_case
def test_rotary_cache_rejects_a_cache_of_another_layout() -> None:
    qkv, _, rope = _qkv_and_rope(2, 4, 2, 32, 16, torch.float32, DEVICE, seed=1)
    k_cache, v_cache = _caches(8, 2, 32, torch.float32, DEVICE, 2)
    slots = torch.tensor([1, 5], device=DEVICE)
    assert kernel.cache_supported(qkv, 4, k_cache, v_cache)
    assert not kernel.cache_supported(qkv, 4, k_cache.half(), v_cache.half())
    assert not kernel.cache_supported(qkv, 2, k_cache, v_cache)  # 2 q heads: kv heads of 3
    with pytest.raises(ValueError, match="rotary \\+ cache"):
        kernel.rotary_cache_(qkv, 4, rope.cos, rope.sin, 16, k_cache[:, :1], v_cache[:, :1], slots)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 32, 4096])
def test_rotary_cache_bf16_glm45v_heads(tokens: int) -> None:
    qkv, _, rope = _qkv_and_rope(tokens, 96, 8, 128, 64, torch.bfloat16, "cuda", seed=tokens)
    k_cache, v_cache = _caches(2 * tokens + 3, 8, 128, torch.bfloat16, "cuda", tokens)
    slots = torch.randperm(2 * tokens + 3, device="cuda")[:tokens]
    before, cache_before = qkv.clone(), k_cache.clone()
    kernel.rotary_cache_(qkv, 96, rope.cos, rope.sin, 64, k_cache, v_cache, slots)
    _assert_bf16_rotated(qkv, before, rope.cos, rope.sin)
    assert torch.equal(k_cache[slots], qkv[:, 96:104])  # the rotated k heads
    assert torch.equal(v_cache[slots], before[:, 104:])
    others = torch.ones(2 * tokens + 3, dtype=torch.bool, device="cuda")
    others[slots] = False
    assert torch.equal(k_cache[others], cache_before[others])


@kernel_case
def test_attention_prologue_equals_rotating_then_writing_the_cache(monkeypatch) -> None:
    from models.layers import attention as attention_module
    from models.layers.attention import Attention, AttentionMetadata

    monkeypatch.setattr(attention_module, "triton_enabled", lambda t: True)  # CPU interpreter
    hq, hk, d, rotary_dim, block, t = 4, 2, 32, 16, 4, 6
    qkv, _, rope = _qkv_and_rope(t, hq, hk, d, rotary_dim, torch.float32, DEVICE, seed=9)
    tables = torch.tensor([[3, 1]], dtype=torch.int32)  # the 6 tokens: block 3, then block 1
    pos = torch.arange(t)
    meta = AttentionMetadata(
        cu_seqlens_q=torch.tensor([0, t], dtype=torch.int32),
        seq_lens_k=torch.tensor([t], dtype=torch.int32),
        max_seqlen_q=t,
        max_seqlen_k=t,
        slot_mapping=tables[0][pos // block].long() * block + pos % block,
        block_tables=tables,
        seq_lens_k_cpu=[t],
        cu_seqlens_q_cpu=[0, t],
    )
    layers = [Attention(hq, hk, d, scale=d**-0.5) for _ in range(2)]
    cache = torch.randn(2, 5, block, hk, d, generator=torch.Generator().manual_seed(3))
    outs = []
    for fused, layer in zip((False, True), layers, strict=True):
        layer.kv_cache = cache.clone()
        heads = qkv.clone()
        q, k, v = heads[:, :hq], heads[:, hq : hq + hk], heads[:, hq + hk :]
        if fused:
            assert layer.rotate_and_cache_(heads, hq, rope.cos, rope.sin, rotary_dim, meta)
        else:
            kernel.rotary_reference_(heads[:, : hq + hk], rope.cos, rope.sin, rotary_dim)
        outs.append(layer(q, k, v, meta, cache_written=fused))
    assert torch.equal(layers[0].kv_cache, layers[1].kv_cache)
    assert torch.equal(outs[0], outs[1])


class _Recorder:
    """Stands in for a kernel: records each launch's arguments instead of running it."""

    def __init__(self) -> None:
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


_TL_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int64: "i64",
}


def _sm90_ptx(fn, args: tuple, kwargs: dict) -> str:
    """PTX of ``fn`` compiled for sm_90 (no GPU needed) with one recorded launch's argument
    types, constexprs and options."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    jit = fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)  # the interpreter's wrapper
    signature, constexprs = {}, {}
    for name, arg in zip(jit.arg_names, args, strict=False):
        if isinstance(arg, torch.Tensor):
            signature[name] = "*" + _TL_TYPES[arg.dtype]
        else:
            signature[name] = "i32"
    for name in jit.arg_names[len(args) :]:
        signature[name] = "constexpr"
        constexprs[name] = kwargs[name]
    options = {k: v for k, v in kwargs.items() if k not in constexprs}
    src = ASTSource(jit, signature, constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


# compiled in this process, not the interpreter's (whose kernels' helpers cannot be compiled)
@pytest.mark.skipif(INTERPRETED, reason="compiles the kernels; runs in the normal process")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rounded_variants_compile_without_fma(dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bit for bit with torch needs every product rounded before the sum. Compiled with FP
    contraction (Triton's default) ``x1*cos - round(x2*sin)`` becomes one FMA and about a quarter
    of the outputs move by an ulp; the interpreter never fuses, so this compiles the launches
    the wrappers make for sm_90 (GLM-4.5V's decoder layout) and reads the PTX."""
    import re

    from triton.backends import backends

    from kernels import rotary

    if "nvidia" not in backends:
        pytest.skip("Triton's CUDA backend is not installed")
    recorders = {name: _Recorder() for name in ("_rotary_kernel", "_rotary_cache_kernel")}
    real = {name: getattr(rotary, name) for name in recorders}
    for name, rec in recorders.items():
        monkeypatch.setattr(rotary, name, rec)
    t, hq, hk, d = 2, 96, 8, 128
    qkv = torch.zeros(t, hq + 2 * hk, d, dtype=dtype)
    cos = torch.zeros(t, 1, 32, dtype=dtype)
    cache = torch.zeros(2, 4, 16, hk, d, dtype=dtype)
    k_cache, v_cache = cache[0].view(-1, hk, d), cache[1].view(-1, hk, d)
    rotary.rotary_(qkv[:, : hq + hk], cos, cos, 64)
    rotary.rotary_cache_(qkv, hq, cos, cos, 64, k_cache, v_cache, torch.arange(t))
    for name, rec in recorders.items():
        ((args, kwargs),) = rec.launches
        ptx = _sm90_ptx(real[name], args, kwargs)
        assert re.search(r"\bmul\.rn\.(bf16|f16|f32)\b", ptx), f"{name}: no rounded multiply"
        fused = re.findall(r"\bfma\.rn\.(?:bf16|f16|f32)\b", ptx)
        assert not fused, f"{name} ({dtype}): products folded into {len(fused)} FMAs"
