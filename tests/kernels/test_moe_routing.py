"""Triton GLM-4.5 MoE routing against the torch reference, and the router layer.

On a GPU the kernel runs compiled; on CPU under Triton's interpreter in a fresh pytest process
(``test_cases_pass_under_the_interpreter``). Routing is float32 throughout, so the interpreter
covers it fully. The kernel returns the experts in descending order and the reference in none,
so experts are compared as sets. Where float32 sigmoid implementations differ by an ulp, a near
tie at the k-th place may pick the other expert: those tokens must still hold a valid top-k of
the reference's selection scores, and be rare.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import CAN_RUN, DEVICE, interpreter_test, kernel_case

from kernels import dispatch
from models.layers.moe import TopKRouter

pytest.importorskip("triton")


test_cases_pass_under_the_interpreter = interpreter_test(__file__)

if CAN_RUN:
    from kernels import moe_routing as kernel


def _logits(t: int, e: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(t, e, generator=gen) * 2).to(device)
    bias = (torch.randn(e, generator=gen) * 0.3).to(device)  # large enough to change choices
    return logits, bias


def _assert_same_routing(got, want, logits, bias, n_group, topk_group, near_tie_share=0.0):
    """Same experts (as sets) and weights; ids that differ must be an ulp-level tie."""
    assert got.ids.shape == want.ids.shape and got.weights.dtype == torch.float32
    got_ids, got_order = got.ids.long().sort(dim=1)
    want_ids, want_order = want.ids.sort(dim=1)
    same = (got_ids == want_ids).all(dim=1)  # [T]
    assert same.float().mean().item() >= 1.0 - near_tie_share
    if not same.all():
        # the reference's selection scores, with its group limit applied
        choice = logits.sigmoid() + bias
        if n_group > 1:
            choice = kernel._limit_groups(choice, n_group, topk_group)
        rows = (~same).nonzero().squeeze(1)
        picked = choice[rows].gather(1, got.ids[rows].long()).min(dim=1).values
        others = choice[rows].scatter(1, got.ids[rows].long(), float("-inf")).max(dim=1).values
        assert (picked >= others - 1e-6).all(), "the kernel's experts are not a top-k"
    got_w = got.weights.gather(1, got_order)[same]
    want_w = want.weights.gather(1, want_order)[same]
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-7)


@kernel_case
@pytest.mark.parametrize(
    ("e", "top_k", "n_group", "topk_group", "renorm", "scaling"),
    [
        (64, 8, 1, 1, True, 1.0),
        (64, 6, 8, 3, True, 2.5),  # group limit: 3 of 8 groups of 8
        (48, 4, 4, 2, False, 1.0),  # no renormalisation; group size not a power of two
        (16, 3, 16, 5, True, 1.0),  # one expert per group: a group scores its best alone
    ],
)
def test_matches_reference(e, top_k, n_group, topk_group, renorm, scaling) -> None:
    logits, bias = _logits(6, e, DEVICE, seed=e + n_group)
    args = (logits, bias, top_k, n_group, topk_group, renorm, scaling)
    got, want = kernel.route_topk(*args), kernel.route_topk_reference(*args)
    assert got.ids.dtype == torch.int64
    _assert_same_routing(got, want, logits, bias, n_group, topk_group)


@kernel_case
def test_int32_ids_and_group_limit_changes_the_choice() -> None:
    logits, bias = _logits(12, 64, DEVICE, seed=9)
    limited = kernel.route_topk(logits, bias, 8, 8, 2, ids_dtype=torch.int32)
    assert limited.ids.dtype == torch.int32
    # every token's experts come from at most two groups of eight
    assert all(len(set(row)) <= 2 for row in (limited.ids // 8).tolist())
    free = kernel.route_topk(logits, bias, 8)
    assert not torch.equal(limited.ids.long().sort(1).values, free.ids.sort(1).values)


@kernel_case
def test_rejects_groups_too_small_for_top_k() -> None:
    logits, bias = _logits(2, 16, DEVICE, seed=1)
    assert not kernel.supported(logits, 4, 1, 8)  # one group of 4 cannot give 8 experts
    with pytest.raises(ValueError, match="groups must hold top_k"):
        kernel.route_topk(logits, bias, 8, 4, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 32, 256, 4096])
@pytest.mark.parametrize(("n_group", "topk_group"), [(1, 1), (8, 4)])
def test_glm45v_router_sizes(tokens: int, n_group: int, topk_group: int) -> None:
    logits, bias = _logits(tokens, 128, "cuda", seed=tokens + n_group)
    args = (logits, bias, 8, n_group, topk_group, True, 1.0)
    got, want = kernel.route_topk(*args), kernel.route_topk_reference(*args)
    _assert_same_routing(got, want, logits, bias, n_group, topk_group, near_tie_share=1e-3)


@pytest.mark.gpu
def test_replays_in_a_cuda_graph() -> None:
    logits, bias = _logits(32, 128, "cuda", seed=21)
    kernel.route_topk(logits, bias, 8)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernel.route_topk(logits, bias, 8)
    fresh, _ = _logits(32, 128, "cuda", seed=22)
    logits.copy_(fresh)
    graph.replay()
    want = kernel.route_topk_reference(fresh, bias, 8)
    _assert_same_routing(captured, want, fresh, bias, 1, 1, near_tie_share=1 / 32)


@pytest.mark.gpu
def test_layer_agrees_with_triton_on_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(6)
    router = TopKRouter(4096, 128, 8).cuda()
    router.weight.data.copy_(torch.randn(128, 4096, generator=gen) * 0.02)
    router.e_score_correction_bias.data.copy_(torch.randn(128, generator=gen) * 0.3)
    x = torch.randn(256, 4096, generator=gen).to("cuda", torch.bfloat16)
    calls = []
    real = kernel.route_topk
    monkeypatch.setattr(kernel, "route_topk", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(dispatch, "TRITON_DISABLED", False)
    on = router(x)
    assert calls, "the router did not take the kernel on CUDA"
    monkeypatch.setattr(dispatch, "TRITON_DISABLED", True)
    calls.clear()
    off = router(x)
    assert not calls
    assert on.ids.dtype == off.ids.dtype == torch.int64
    logits = x.float() @ router.weight.float().t()
    bias = router.e_score_correction_bias
    _assert_same_routing(on, off, logits, bias, 1, 1, near_tie_share=1e-2)
