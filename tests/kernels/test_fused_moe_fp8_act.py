"""FP8-activation (W8A8) fused experts against a torch loop that quantises the same way.

``_w8a8_reference`` is ``experts_reference``'s per-expert loop on the dequantised weights, with
``x`` quantised per token by ``quant_fp8_per_token_reference`` and ``h`` (rounded to ``x.dtype``
first, as the kernel stores it) quantised per slot row the same way, both used dequantised. The
kernels run compiled on a GPU and under Triton's interpreter on CPU in a fresh pytest process
(``test_cases_pass_under_the_interpreter``). The interpreter multiplies e4m3 tiles exactly
(through float16), but its own float32 -> e4m3 cast drops the carry of a rounding that crosses a
power of two (127.99 -> 64, not 128) and rounds ties away from even, and its float32 -> bfloat16
cast truncates; the GPU's conversions round to nearest even, as torch's do. Under the
interpreter these tests therefore run both casts through torch (``_round_casts_like_the_gpu``),
so what they check is the kernels' logic, not the interpreter's conversions. ``experts_reference``
itself (without the quantised ``h``) is checked too, to a looser bound.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import DEVICE, INTERPRETED, interpreter_test, kernel_case

from kernels import dispatch, fused_moe
from kernels.quant_fp8 import quant_fp8_per_token_reference
from models.layers.moe import RouterOutput, experts_reference

pytest.importorskip("triton")

test_cases_pass_under_the_interpreter = interpreter_test(__file__)


def _round_casts_like_the_gpu() -> None:
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    real_fp_to_fp, real_trunc = builder.create_fp_to_fp, builder.create_fp_trunc

    def through_torch(src, torch_dtype, bits_dtype, tl_dtype):
        values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
        bits = values.to(torch_dtype).view(bits_dtype).numpy()
        return interpreter.TensorHandle(
            bits.view(np.uint8 if bits.itemsize == 1 else np.uint16), tl_dtype
        )

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            return through_torch(src, torch.float8_e4m3fn, torch.uint8, tl.float8e4nv)
        return real_fp_to_fp(self, src, dst_type, rounding_mode)

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return through_torch(src, torch.bfloat16, torch.int16, tl.bfloat16)
        return real_trunc(self, src, dst_type)

    builder.create_fp_to_fp, builder.create_fp_trunc = create_fp_to_fp, create_fp_trunc


if INTERPRETED:
    _round_casts_like_the_gpu()

E, HIDDEN, INTER = 8, 64, 32  # small stand-ins for 128 experts, H 4096, I 1408


def _dequantised(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:  # float32, q's shape
    return q.float() * scale


def _fp8_experts(e: int, h: int, i: int, seed: int, device: str):
    """(q13 [E, 2I, H] e4m3, s13 [E, 2I, 1], q2 [E, H, I] e4m3, s2 [E, H, 1]) float32 scales."""
    from models.layers.fp8 import quantize_per_channel

    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, 2 * i, h, generator=gen) / h**0.5
    w2 = torch.randn(e, h, i, generator=gen) / i**0.5
    (q13, s13), (q2, s2) = quantize_per_channel(w13), quantize_per_channel(w2)
    return tuple(v.to(device) for v in (q13, s13, q2, s2))


def _batch(t: int, k: int, e: int, h: int, dtype: torch.dtype, seed: int, device: str = DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen)
    x[t // 2] *= 20  # one loud token: per-token scales must not be shared across rows
    # folded ids leave the last three experts empty and may repeat an expert within a token
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) % (e - 3)
    route = RouterOutput(torch.rand(t, k, generator=gen).to(device), ids.long().to(device))
    return x.to(device, dtype), route


def _w8a8_reference(x, q13, s13, q2, s2, route, expert_start: int = 0) -> torch.Tensor:
    """[T, H] float32: the dequantised experts on per-token e4m3 x and per-row e4m3 h."""
    t, k = route.ids.shape
    xq = quant_fp8_per_token_reference(x)
    xd = _dequantised(xq.q, xq.scale)  # [T, H]
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    local = route.ids.reshape(-1) - expert_start  # [T*K]
    weights = route.weights.reshape(-1)
    for e in range(q13.shape[0]):
        slots = (local == e).nonzero().squeeze(1)
        if slots.numel() == 0:
            continue
        tokens = slots // k
        gate, up = (xd[tokens] @ _dequantised(q13[e], s13[e]).t()).chunk(2, -1)
        h = (F.silu(gate) * up).to(x.dtype)  # the kernel stores h in x.dtype, then quantises
        hq = quant_fp8_per_token_reference(h)
        y = _dequantised(hq.q, hq.scale) @ _dequantised(q2[e], s2[e]).t()
        out.index_add_(0, tokens, y * weights[slots, None])
    return out


def _assert_w8a8(got, x, q13, s13, q2, s2, route, expert_start: int = 0) -> None:
    want = _w8a8_reference(x, q13, s13, q2, s2, route, expert_start)
    assert got.dtype == torch.float32 and got.shape == want.shape
    scale = want.abs().max()
    assert scale > 0.1
    if INTERPRETED:  # exact e4m3 products and torch's casts: only float32 summation order left
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale.item())
    else:
        # on a GPU a bfloat16 h one ulp apart can move an e4m3 code, or its row's scale, one
        # step (measured on an H200: 0.2% of outputs off by up to 3% of the largest); the check
        # against unquantised h below bounds how far those go
        close = torch.isclose(got, want, rtol=1e-2, atol=1e-2 * scale.item())
        assert close.float().mean().item() >= 0.99
    # the same layer without quantised h: the e4m3 rounding of h is all that separates them
    xq = quant_fp8_per_token_reference(x)
    loose = experts_reference(
        _dequantised(xq.q, xq.scale),
        _dequantised(q13, s13),
        _dequantised(q2, s2),
        route,
        expert_start,
    )
    assert (got - loose).abs().max() <= 0.05 * loose.abs().max()  # measured: <= 0.03


def _run(x, q13, s13, q2, s2, route, **kw) -> torch.Tensor:
    return fused_moe.fused_experts(
        x, q13, q2, route.weights, route.ids, w13_scale=s13, w2_scale=s2, **kw
    )


@kernel_case
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("t", "k"), [(1, 2), (5, 2), (40, 4)])  # 40 x 4: several 64-row blocks
def test_decode_sized_w8a8_matches_the_quantised_loop(dtype, t: int, k: int) -> None:
    # explicit fp8_activations=True: the Triton alignment, with 64-row blocks
    q13, s13, q2, s2 = _fp8_experts(E, HIDDEN, INTER, seed=t, device=DEVICE)
    x, route = _batch(t, k, E, HIDDEN, dtype, seed=t + k)
    for foreign in (False, True):
        got = _run(x, q13, s13, q2, s2, route, foreign_slots=foreign, fp8_activations=True)
        _assert_w8a8(got, x, q13, s13, q2, s2, route)


@kernel_case
def test_prefill_sized_batches_take_w8a8_when_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    # MAX_SLOTS 16 makes 30 slots prefill-sized: the torch alignment, default policy
    monkeypatch.setattr(fused_moe, "MAX_SLOTS", 16)
    monkeypatch.setattr(dispatch, "FP8_ACTIVATIONS", True)
    quantised = []
    real_quant = fused_moe.quant_fp8_per_token
    monkeypatch.setattr(
        fused_moe, "quant_fp8_per_token", lambda v: quantised.append(v.shape) or real_quant(v)
    )
    q13, s13, q2, s2 = _fp8_experts(E, HIDDEN, INTER, seed=2, device=DEVICE)
    x, route = _batch(15, 2, E, HIDDEN, torch.bfloat16, seed=2)
    got = _run(x, q13, s13, q2, s2, route)
    assert [s[1] for s in quantised] == [HIDDEN, INTER]  # x, then h
    _assert_w8a8(got, x, q13, s13, q2, s2, route)
    quantised.clear()
    _run(x[:8], q13, s13, q2, s2, RouterOutput(route.weights[:8], route.ids[:8]))  # 16 slots
    assert not quantised, "a decode-sized batch quantised its activations by default"
    monkeypatch.setattr(dispatch, "FP8_ACTIVATIONS", False)
    _run(x, q13, s13, q2, s2, route)
    assert not quantised, "W8A8 ran with the default switched off"


@kernel_case
def test_uneven_widths_and_other_ranks_experts() -> None:
    # H 80 and I 48: masked reduction tails and wrapped columns; this rank holds experts 4..7
    q13, s13, q2, s2 = _fp8_experts(2 * E, 80, 48, seed=6, device=DEVICE)
    x, route = _batch(9, 4, 2 * E, 80, torch.bfloat16, seed=6)
    own = slice(4, 8)
    got = _run(x, q13[own], s13[own], q2[own], s2[own], route, expert_start=4, fp8_activations=True)
    _assert_w8a8(got, x, q13[own], s13[own], q2[own], s2[own], route, expert_start=4)


@kernel_case
def test_all_zero_tokens_stay_zero() -> None:
    q13, s13, q2, s2 = _fp8_experts(E, HIDDEN, INTER, seed=8, device=DEVICE)
    x, route = _batch(4, 2, E, HIDDEN, torch.bfloat16, seed=8)
    x[1] = 0  # the quantiser's amax floor keeps its scale finite: codes and output are zero
    got = _run(x, q13, s13, q2, s2, route, fp8_activations=True)
    assert torch.isfinite(got).all() and torch.equal(got[1], torch.zeros_like(got[1]))


def test_fp8_activations_need_fp8_weights() -> None:
    x, route = _batch(2, 2, E, HIDDEN, torch.bfloat16, seed=1, device="cpu")
    w13 = torch.zeros(E, 2 * INTER, HIDDEN, dtype=torch.bfloat16)
    w2 = torch.zeros(E, HIDDEN, INTER, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="fp8_activations"):
        fused_moe.fused_experts(x, w13, w2, route.weights, route.ids, fp8_activations=True)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [32, 700])  # 700 x 8 slots: past MAX_SLOTS
def test_gpu_w8a8_matches_the_quantised_loop(tokens: int) -> None:
    q13, s13, q2, s2 = _fp8_experts(32, 512, 256, seed=tokens, device="cuda")
    gen = torch.Generator("cuda").manual_seed(tokens)
    x = torch.randn(tokens, 512, generator=gen, device="cuda").bfloat16()
    ids = torch.rand(tokens, 32, generator=gen, device="cuda").argsort(1)[:, :8].contiguous()
    route = RouterOutput(torch.rand(tokens, 8, generator=gen, device="cuda"), ids)
    got = _run(x, q13, s13, q2, s2, route, foreign_slots=False, fp8_activations=True)
    # NOTE: sm_90 accumulates e4m3 products at reduced precision inside each wgmma; if this
    # fails by a little, that (tl.dot's max_num_imprecise_acc) is the first suspect
    _assert_w8a8(got, x, q13, s13, q2, s2, route)


@pytest.mark.gpu
def test_gpu_w8a8_replays_in_a_cuda_graph() -> None:
    q13, s13, q2, s2 = _fp8_experts(16, 256, 128, seed=9, device="cuda")
    x = torch.randn(600, 256, device="cuda").bfloat16()
    route = RouterOutput(torch.rand(600, 8, device="cuda"), torch.randint(0, 16, (600, 8)).cuda())
    _run(x, q13, s13, q2, s2, route, fp8_activations=True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _run(x, q13, s13, q2, s2, route, fp8_activations=True)
    x.copy_(torch.randn(600, 256, device="cuda").bfloat16())
    route.ids.copy_(torch.randint(0, 16, (600, 8), device="cuda"))
    graph.replay()
    _assert_w8a8(captured, x, q13, s13, q2, s2, route)
