"""Grouped expert GEMMs and the sorted MoE combine against independent references.

The per-expert loop (``experts_reference``, the implementation the model was validated with
against transformers) and a per-token dense computation are the references; inputs are fresh
random tensors, with empty experts, repeated experts across tokens and slots owned by other ranks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.moe_grouped_gemm import grouped_mm, grouped_mm_reference
from models.layers.moe import FusedMoE, RouterOutput, experts_grouped, experts_reference


def _offsets(group_of_row: torch.Tensor, groups: int) -> torch.Tensor:  # sorted [M] -> [G] int32
    return torch.searchsorted(group_of_row, torch.arange(1, groups + 1), out_int32=True)


def _dense_groups(x, w, group_of_row) -> torch.Tensor:  # every row through its own matrix
    return torch.stack([w[g] @ x[r] for r, g in enumerate(group_of_row.tolist())])


def _route(t: int, e: int, k: int, seed: int) -> RouterOutput:
    gen = torch.Generator().manual_seed(seed)
    # folding the ids leaves the last three experts empty and crowds the first ones (a token
    # may then pick one expert twice: both paths must simply add it twice)
    ids = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)]) % (e - 3)
    return RouterOutput(torch.rand(t, k, generator=gen), ids.long())


def _experts(e: int, h: int, i: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, 2 * i, h, generator=gen) / h**0.5  # [E, 2I, H]
    w2 = torch.randn(e, h, i, generator=gen) / i**0.5  # [E, H, I]
    return w13, w2


def _per_token(x, w13, w2, route) -> torch.Tensor:  # [T, H] float64, one token at a time
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for e, wt in zip(route.ids[t].tolist(), route.weights[t].tolist(), strict=True):
            gate, up = (w13[e].double() @ x[t].double()).chunk(2)
            out[t] += wt * (w2[e].double() @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("use_fused", [False, True])
def test_grouped_mm_multiplies_each_row_block_by_its_group(use_fused: bool) -> None:
    if use_fused and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch without _grouped_mm")
    gen = torch.Generator().manual_seed(1)
    groups, m = 6, 40
    x = torch.randn(m, 24, generator=gen)
    w = torch.randn(groups, 16, 24, generator=gen)
    group_of_row = torch.randint(0, groups, (m,), generator=gen).sort().values
    group_of_row[group_of_row == 2] = 3  # group 2 empty
    got = grouped_mm(x, w, _offsets(group_of_row, groups), use_fused=use_fused)
    torch.testing.assert_close(got, _dense_groups(x, w, group_of_row), rtol=1e-5, atol=1e-5)


def test_grouped_mm_leaves_rows_past_the_last_offset_to_the_caller() -> None:
    x = torch.randn(10, 8)
    w = torch.randn(2, 4, 8)
    offs = torch.tensor([3, 7], dtype=torch.int32)  # rows 7..9 belong to no group
    got = grouped_mm_reference(x, w, offs)
    torch.testing.assert_close(got[:7], _dense_groups(x[:7], w, torch.tensor([0] * 3 + [1] * 4)))


@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_grouped_experts_match_the_per_expert_loop(tokens: int) -> None:
    e, h, i, k = 16, 48, 32, 4
    x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(tokens))
    w13, w2 = _experts(e, h, i, seed=2)
    route = _route(tokens, e, k, seed=tokens)
    want = experts_reference(x, w13, w2, route)
    for foreign in (False, True):
        got = experts_grouped(x, w13, w2, route, foreign_slots=foreign)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.double(), _per_token(x, w13, w2, route), rtol=0, atol=1e-5)


def test_expert_parallel_ranks_sum_to_the_whole_layer() -> None:
    e, h, i, k, t, world = 16, 32, 24, 4, 21, 4
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(5))
    w13, w2 = _experts(e, h, i, seed=6)
    route = _route(t, e, k, seed=7)
    per_rank = e // world
    partials = []
    for rank in range(world):
        own = slice(rank * per_rank, (rank + 1) * per_rank)
        got = experts_grouped(x, w13[own], w2[own], route, rank * per_rank, foreign_slots=True)
        want = experts_reference(x, w13[own], w2[own], route, rank * per_rank)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        partials.append(got)
    whole = experts_grouped(x, w13, w2, route, foreign_slots=False)
    torch.testing.assert_close(sum(partials), whole, rtol=0, atol=1e-5)


def test_rank_without_routed_tokens_and_empty_batch_give_zeros() -> None:
    w13, w2 = _experts(8, 16, 8, seed=3)
    x = torch.randn(5, 16)
    route = RouterOutput(torch.rand(5, 2), torch.tensor([[0, 1]] * 5))
    assert torch.equal(experts_grouped(x, w13[4:], w2[4:], route, 4), torch.zeros(5, 16))
    empty = RouterOutput(torch.rand(0, 2), torch.zeros(0, 2, dtype=torch.long))
    assert experts_grouped(x[:0], w13, w2, empty).shape == (0, 16)


def test_foreign_slot_garbage_never_reaches_the_output() -> None:
    # the fused path leaves rows of other ranks' slots unspecified; they must be dropped even
    # when that memory holds NaN
    w13, w2 = _experts(8, 16, 8, seed=4)
    x = torch.randn(6, 16)
    route = _route(6, 8, 2, seed=4)

    def nan_tail(xs, w, offs, use_fused=None):
        out = grouped_mm_reference(xs, w, offs)
        out[int(offs[-1]) :] = float("nan")
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("models.layers.moe.grouped_mm", nan_tail)
        got = experts_grouped(x, w13[:4], w2[:4], route, 0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, experts_reference(x, w13[:4], w2[:4], route), atol=1e-6, rtol=0)


def test_fused_moe_layer_routes_through_the_grouped_path() -> None:
    layer = FusedMoE(num_experts=8, hidden_size=16, intermediate_size=12, dtype=torch.float32)
    w13, w2 = _experts(8, 16, 12, seed=8)
    layer.w13_weight.data.copy_(w13)
    layer.w2_weight.data.copy_(w2)
    x = torch.randn(9, 16)
    route = _route(9, 8, 3, seed=9)
    torch.testing.assert_close(
        layer(x, route), experts_reference(x, w13, w2, route), atol=1e-6, rtol=0
    )


@pytest.mark.gpu
def test_cuda_bf16_grouped_experts_match_the_loop() -> None:
    dev = torch.device("cuda")
    e, h, i, k, t = 32, 256, 128, 8, 48
    w13, w2 = (w.to(dev, torch.bfloat16) for w in _experts(e, h, i, seed=10))
    x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
    route = _route(t, e, k, seed=11)
    route = RouterOutput(route.weights.to(dev), route.ids.to(dev))
    want = experts_reference(x, w13, w2, route)
    # the grouped GEMM path itself (a batch this small would otherwise take the fused kernels)
    got = experts_grouped(x, w13, w2, route, foreign_slots=False, use_triton=False)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
