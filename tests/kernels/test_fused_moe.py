"""Fused-MoE slot alignment and Triton expert kernels against the per-expert loop.

The torch alignment is checked directly (the Triton one against it in ``test_moe_align.py``).
The kernels run compiled on a GPU and on CPU under Triton's interpreter in a fresh pytest process
(``test_cases_pass_under_the_interpreter``), the decode-sized cases with the Triton alignment;
``experts_reference`` (``models/layers/moe.py``) is the reference, on fresh random inputs with
empty experts, repeated experts, one crowded expert and other ranks' experts. The interpreter
multiplies bfloat16 tiles as their raw uint16 bits, so under it the tests widen bfloat16 dot
operands to float32 first (exact, like the tensor cores' products); its float32 -> bfloat16
casts truncate, which the half-precision tolerances cover.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import DEVICE, INTERPRETED, interpreter_test, kernel_case

from kernels import dispatch, fused_moe, moe_align
from models.layers.moe import RouterOutput, experts_grouped, experts_reference

pytest.importorskip("triton")


test_cases_pass_under_the_interpreter = interpreter_test(__file__)


def _widen_bf16_dot_operands() -> None:
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    real_dot = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << 16  # bf16 is the top half of a float32
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, acc, input_precision, max_num_imprecise_acc):
        return real_dot(self, widen(a), widen(b), acc, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


if INTERPRETED:
    _widen_bf16_dot_operands()

E, HIDDEN, INTER = 8, 64, 32  # small stand-ins for 128 experts, H 4096, I 1408


def _route(t: int, k: int, e: int, seed: int, device: str = "cpu") -> RouterOutput:
    gen = torch.Generator().manual_seed(seed)
    # folding leaves the last three experts empty and crowds the first ones; a token may then
    # pick one expert twice, which both paths must simply add twice
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) % (e - 3)
    return RouterOutput(torch.rand(t, k, generator=gen).to(device), ids.long().to(device))


def _inputs(t: int, e: int, h: int, i: int, dtype: torch.dtype, seed: int, device: str = DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen)
    w13 = torch.randn(e, 2 * i, h, generator=gen) / h**0.5  # [E, 2I, H]
    w2 = torch.randn(e, h, i, generator=gen) / i**0.5  # [E, H, I]
    return (v.to(device, dtype) for v in (x, w13, w2))


def _exact(x, w13, w2, route, expert_start=0) -> torch.Tensor:  # [T, H] float64, per token
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    x, w13, w2 = x.cpu().double(), w13.cpu().double(), w2.cpu().double()
    for t, (experts, weights) in enumerate(
        zip(route.ids.tolist(), route.weights.tolist(), strict=True)
    ):
        for e, wt in zip(experts, weights, strict=True):
            if 0 <= e - expert_start < w13.shape[0]:
                gate, up = (w13[e - expert_start] @ x[t]).chunk(2)
                out[t] += wt * (w2[e - expert_start] @ (F.silu(gate) * up))
    return out


def _assert_matches(got, x, w13, w2, route, expert_start=0) -> None:
    want = experts_reference(x, w13, w2, route, expert_start)
    assert got.dtype == torch.float32 and got.shape == want.shape
    if x.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    # the reference rounds g, u, h and y to the half dtype; the kernels only h
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    exact = _exact(x, w13, w2, route, expert_start)
    assert (got.cpu().double() - exact).abs().max() <= 1e-2 * exact.abs().max()


def _check_alignment(aligned, ids, e: int, expert_start: int = 0) -> None:
    slots, bm = ids.numel(), fused_moe.BLOCK_M
    rows = aligned.sorted_slot_ids.tolist()
    assert len(rows) == moe_align.max_padded_rows(slots, e) and len(rows) % bm == 0
    assert (
        aligned.block_expert.dtype == torch.int32 and len(aligned.block_expert) == len(rows) // bm
    )
    local = (ids.reshape(-1) - expert_start).tolist()
    owned = [s for s in range(slots) if 0 <= local[s] < e]
    used = int(aligned.num_padded.item())
    counts = [sum(1 for s in owned if local[s] == x) for x in range(e)]
    assert used == sum(-(-c // bm) * bm for c in counts)
    assert all(r == slots for r in rows[used:])  # unused tail: sentinels only
    assert all(b == e for b in aligned.block_expert[used // bm :].tolist())
    start = 0
    for expert, count in enumerate(counts):  # one padded group per expert, in expert order
        group = rows[start : start + -(-count // bm) * bm]
        assert group[:count] == [s for s in owned if local[s] == expert]  # token order kept
        assert all(r == slots for r in group[count:])
        blocks = aligned.block_expert[start // bm : (start + len(group)) // bm]
        assert all(b == expert for b in blocks.tolist())
        start += len(group)


@pytest.mark.parametrize(("t", "k", "e"), [(1, 2, 8), (3, 4, 8), (17, 4, 8), (40, 8, 128)])
def test_alignment_pads_each_expert_group_with_sentinels(t: int, k: int, e: int) -> None:
    route = _route(t, k, e, seed=t)
    _check_alignment(moe_align.align_slots(route.ids, e, foreign_slots=False), route.ids, e)


def test_alignment_drops_other_ranks_experts_and_reuses_edges() -> None:
    route = _route(17, 4, 16, seed=3)
    edges = torch.arange(5)
    for start in (0, 4, 12):  # ids below, above and on both sides of this rank's four experts
        aligned = moe_align.align_slots(route.ids, 4, start, foreign_slots=True, edges=edges)
        _check_alignment(aligned, route.ids, 4, start)
    nobody = moe_align.align_slots(route.ids, 2, 14, foreign_slots=True)  # experts 14, 15 empty
    assert int(nobody.num_padded.item()) == 0
    assert (nobody.sorted_slot_ids == route.ids.numel()).all()


def test_max_padded_rows_is_a_bound_from_shapes() -> None:
    assert moe_align.max_padded_rows(8, 128) == 8 + 8 * 15  # each slot on its own expert
    assert moe_align.max_padded_rows(4096, 128) == 4096 + 128 * 15
    assert moe_align.max_padded_rows(3, 2) == 48  # 3 + 2 * 15 = 33, rounded up


@kernel_case
@pytest.mark.parametrize(
    ("dtype", "t", "k"),
    [
        (torch.float32, 1, 2),
        (torch.float32, 3, 4),
        (torch.float32, 17, 4),  # 68 slots: the second tile bucket
        (torch.float16, 3, 4),
        (torch.bfloat16, 1, 4),
        (torch.bfloat16, 17, 2),
    ],
)
def test_fused_experts_match_the_per_expert_loop(dtype: torch.dtype, t: int, k: int) -> None:
    x, w13, w2 = _inputs(t, E, HIDDEN, INTER, dtype, seed=t + k)
    route = _route(t, k, E, seed=10 * t + k, device=DEVICE)
    for foreign in (False, True):
        got = fused_moe.fused_experts(x, w13, w2, route.weights, route.ids, foreign_slots=foreign)
        _assert_matches(got, x, w13, w2, route)


@kernel_case
@pytest.mark.parametrize(("t", "k", "hidden"), [(1, 9, HIDDEN), (6, 3, 80)])
def test_combine_rounds_the_float32_sum_once(t: int, k: int, hidden: int) -> None:
    # the k slots are added in float32 and rounded to out_dtype in one kernel
    x, w13, w2 = _inputs(t, E, hidden, INTER, torch.float16, seed=t * k)
    route = _route(t, k, E, seed=t + k, device=DEVICE)
    f32 = fused_moe.fused_experts(x, w13, w2, route.weights, route.ids)
    half = fused_moe.fused_experts(x, w13, w2, route.weights, route.ids, out_dtype=torch.float16)
    assert f32.dtype == torch.float32 and half.dtype == torch.float16
    torch.testing.assert_close(half, f32.half(), rtol=1e-3, atol=1e-4)
    assert f32.abs().max() > 0.1


@kernel_case
def test_one_expert_taking_every_slot_spans_several_blocks() -> None:
    x, w13, w2 = _inputs(17, E, HIDDEN, INTER, torch.float32, seed=4)
    ids = torch.full((17, 2), 5, dtype=torch.long, device=DEVICE)  # 34 slots: three row blocks
    route = RouterOutput(torch.rand(17, 2, generator=torch.Generator().manual_seed(4)), ids)
    route = RouterOutput(route.weights.to(DEVICE), ids)
    got = fused_moe.fused_experts(x, w13, w2, route.weights, route.ids, foreign_slots=False)
    _assert_matches(got, x, w13, w2, route)


@kernel_case
def test_uneven_widths_mask_the_reduction_and_the_columns() -> None:
    # H 80 and I 48 are not multiples of the tiles: masked reduction tails, wrapped columns
    x, w13, w2 = _inputs(5, E, 80, 48, torch.float32, seed=6)
    route = _route(5, 3, E, seed=6, device=DEVICE)
    got = fused_moe.fused_experts(x, w13, w2, route.weights, route.ids)
    _assert_matches(got, x, w13, w2, route)


@kernel_case
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_parallel_ranks_add_up_to_the_whole_layer(dtype: torch.dtype) -> None:
    t, k, world = 9, 4, 4
    x, w13, w2 = _inputs(t, 2 * E, HIDDEN, INTER, dtype, seed=7)
    route = _route(t, k, 2 * E, seed=7, device=DEVICE)
    per_rank = 2 * E // world
    partials = []
    for rank in range(world):  # the folded ids leave the last rank's last three experts empty
        own = slice(rank * per_rank, (rank + 1) * per_rank)
        got = fused_moe.fused_experts(
            x, w13[own], w2[own], route.weights, route.ids, rank * per_rank, foreign_slots=True
        )
        _assert_matches(got, x, w13[own], w2[own], route, rank * per_rank)
        partials.append(got)
    whole = experts_reference(x, w13, w2, route)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(sum(partials), whole, rtol=tol, atol=tol)


@kernel_case
def test_rank_without_routed_tokens_gives_zeros() -> None:
    x, w13, w2 = _inputs(5, E, HIDDEN, INTER, torch.float32, seed=8)
    route = RouterOutput(torch.rand(5, 2, device=DEVICE), torch.tensor([[0, 1]] * 5, device=DEVICE))
    got = fused_moe.fused_experts(x, w13[4:], w2[4:], route.weights, route.ids, 4)
    assert torch.equal(got, torch.zeros(5, HIDDEN, device=DEVICE))


def test_supported_keeps_prefill_and_mixed_dtypes_off_the_kernels() -> None:
    x, w13, w2 = _inputs(1, E, HIDDEN, INTER, torch.float32, seed=9, device="cpu")
    assert fused_moe.supported(x, w13, w2, fused_moe.MAX_SLOTS)
    assert not fused_moe.supported(x, w13, w2, fused_moe.MAX_SLOTS + 1)
    assert not fused_moe.supported(x.bfloat16(), w13, w2, 8)
    assert not fused_moe.supported(x, w13[:, :-1], w2, 8)  # 2I rows must match w2's I


def test_cpu_layers_keep_the_grouped_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the Triton path ran on CPU")

    monkeypatch.setattr(fused_moe, "fused_experts", refuse)
    x, w13, w2 = _inputs(3, E, HIDDEN, INTER, torch.bfloat16, seed=9, device="cpu")
    route = _route(3, 2, E, seed=9)
    torch.testing.assert_close(
        experts_grouped(x, w13, w2, route), experts_reference(x, w13, w2, route)
    )


AIR_E, AIR_H, AIR_I, AIR_K = 128, 4096, 1408, 8  # GLM-4.5-Air's routed experts


def _air_experts(seed: int) -> tuple[torch.Tensor, torch.Tensor]:  # drawn on the GPU: 3 GB
    gen = torch.Generator("cuda").manual_seed(seed)
    w13 = torch.randn(AIR_E, 2 * AIR_I, AIR_H, generator=gen, device="cuda") / AIR_H**0.5
    w2 = torch.randn(AIR_E, AIR_H, AIR_I, generator=gen, device="cuda") / AIR_I**0.5
    return w13.bfloat16(), w2.bfloat16()


def _air_batch(t: int, seed: int) -> tuple[torch.Tensor, RouterOutput]:
    gen = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(t, AIR_H, generator=gen, device="cuda").bfloat16()
    ids = torch.rand(t, AIR_E, generator=gen, device="cuda").argsort(1)[:, :AIR_K].contiguous()
    return x, RouterOutput(torch.rand(t, AIR_K, generator=gen, device="cuda"), ids)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 32, 512])
def test_glm45_air_widths_match_the_loop(tokens: int) -> None:
    w13, w2 = _air_experts(seed=1)
    x, route = _air_batch(tokens, seed=tokens)
    got = fused_moe.fused_experts(x, w13, w2, route.weights, route.ids, foreign_slots=False)
    # h is rounded to bf16 at different points on the two paths: a near-zero output can move
    # by a few hundredths in one of two million entries
    torch.testing.assert_close(got, experts_reference(x, w13, w2, route), rtol=2e-2, atol=4e-2)


@pytest.mark.gpu
def test_layer_takes_the_kernels_for_decode_and_grouped_mm_for_prefill(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    real = fused_moe.fused_experts
    monkeypatch.setattr(
        fused_moe, "fused_experts", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    monkeypatch.setattr(dispatch, "TRITON_DISABLED", False)
    w13, w2 = _air_experts(seed=2)
    x, route = _air_batch(32, seed=3)
    got = experts_grouped(x, w13, w2, route, foreign_slots=False)
    assert calls, "a 32-token bf16 batch did not take the fused kernels"
    torch.testing.assert_close(got, experts_reference(x, w13, w2, route), rtol=2e-2, atol=2e-2)
    calls.clear()
    x, route = _air_batch(fused_moe.MAX_SLOTS // AIR_K + 1, seed=4)
    experts_grouped(x, w13, w2, route, foreign_slots=False)
    assert not calls, "a prefill-sized batch took the decode kernels"


@pytest.mark.gpu
def test_replays_in_a_cuda_graph() -> None:
    w13, w2 = _air_experts(seed=5)
    x, route = _air_batch(16, seed=5)
    fused_moe.fused_experts(x, w13, w2, route.weights, route.ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_moe.fused_experts(x, w13, w2, route.weights, route.ids)
    fresh_x, fresh = _air_batch(16, seed=6)
    x.copy_(fresh_x)
    route.weights.copy_(fresh.weights)
    route.ids.copy_(fresh.ids)
    graph.replay()
    want = experts_reference(fresh_x, w13, w2, fresh)
    torch.testing.assert_close(captured, want, rtol=2e-2, atol=2e-2)


def _fp8_experts(e: int, h: int, i: int, seed: int, device: str):
    """FP8 codes with per-row scales, and the float32 weights they stand for."""
    from models.layers.fp8 import quantize_per_channel

    gen = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * i, h, generator=gen) / h**0.5).to(device)
    w2 = (torch.randn(e, h, i, generator=gen) / i**0.5).to(device)
    (q13, s13), (q2, s2) = quantize_per_channel(w13), quantize_per_channel(w2)
    deq13, deq2 = q13.float() * s13, q2.float() * s2
    return (q13, s13, q2, s2), (deq13, deq2)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 32, 700])  # 700 x 8 slots: past MAX_SLOTS, 128-row blocks
def test_fp8_weights_match_the_dequantised_loop(tokens: int, monkeypatch) -> None:
    monkeypatch.setattr(dispatch, "FP8_ACTIVATIONS", False)  # W8A16 at every size
    (q13, s13, q2, s2), (deq13, deq2) = _fp8_experts(32, 256, 128, seed=tokens, device="cuda")
    gen = torch.Generator("cuda").manual_seed(tokens)
    x = torch.randn(tokens, 256, generator=gen, device="cuda").bfloat16()
    ids = torch.rand(tokens, 32, generator=gen, device="cuda").argsort(1)[:, :8].contiguous()
    route = RouterOutput(torch.rand(tokens, 8, generator=gen, device="cuda"), ids)
    got = experts_grouped(x, q13, q2, route, foreign_slots=False, w13_scale=s13, w2_scale=s2)
    want = experts_reference(x.float(), deq13, deq2, route)
    torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2)
    assert got.abs().max() > 0.1


@pytest.mark.gpu
def test_fp8_kernels_replay_in_a_cuda_graph() -> None:
    (q13, s13, q2, s2), (deq13, deq2) = _fp8_experts(16, 128, 64, seed=9, device="cuda")
    x = torch.randn(4, 128, device="cuda").bfloat16()
    ids = torch.randint(0, 16, (4, 4), device="cuda")
    route = RouterOutput(torch.rand(4, 4, device="cuda"), ids)
    kw = {"w13_scale": s13, "w2_scale": s2}
    experts_grouped(x, q13, q2, route, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = experts_grouped(x, q13, q2, route, **kw)
    x.copy_(torch.randn(4, 128, device="cuda").bfloat16())
    route.ids.copy_(torch.randint(0, 16, (4, 4), device="cuda"))
    graph.replay()
    want = experts_reference(x.float(), deq13, deq2, route)
    torch.testing.assert_close(captured, want, rtol=3e-2, atol=3e-2)


@kernel_case
@pytest.mark.parametrize("max_slots", [fused_moe.MAX_SLOTS, 4])  # 4: the 128-row prefill blocks
def test_fp8_weights_under_the_kernels_small(max_slots, monkeypatch) -> None:
    monkeypatch.setattr(fused_moe, "MAX_SLOTS", max_slots)
    monkeypatch.setattr(dispatch, "FP8_ACTIVATIONS", False)  # W8A16 past MAX_SLOTS too
    (q13, s13, q2, s2), (deq13, deq2) = _fp8_experts(E, HIDDEN, INTER, seed=3, device=DEVICE)
    route = _route(5, 2, E, seed=4, device=DEVICE)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got = fused_moe.fused_experts(
        x.half(), q13, q2, route.weights, route.ids, w13_scale=s13, w2_scale=s2
    )
    want = experts_reference(x.half().float(), deq13, deq2, route)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert not fused_moe.supported(x.half(), q13, q2, 10)  # FP8 codes need fp8=True
    assert fused_moe.supported(x.half(), q13, q2, 10 * max_slots, fp8=True)
