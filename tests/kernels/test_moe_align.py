"""The one-launch Triton slot alignment (``kernels/moe_align.py``) against the torch one.

``align_slots_triton`` must give exactly ``align_slots``'s three outputs (slot order within an
expert included: the combine adds slots in that order), so every case compares them with
``torch.equal`` on fresh random routings: decode and ``MAX_SLOTS``-sized batches, 16- and 64-row
blocks, more experts than slots, one expert taking every slot, and other ranks' experts under
expert parallelism. The kernel runs compiled on a GPU and on CPU under Triton's interpreter in a
fresh pytest process (``test_cases_pass_under_the_interpreter``); it is integer-only, so the
interpreter checks the same arithmetic.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import DEVICE, interpreter_test, kernel_case

from kernels import fused_moe, moe_align

pytest.importorskip("triton")


test_cases_pass_under_the_interpreter = interpreter_test(__file__)


def _ids(t: int, k: int, low: int, high: int, seed: int, device: str = DEVICE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (t, k), generator=gen).to(device)  # [T, K] int64


def _assert_same_alignment(
    ids: torch.Tensor, e: int, start: int, block_m: int, foreign: bool = True
) -> moe_align.AlignedSlots:
    got = moe_align.align_slots_triton(ids, e, start, block_m)
    want = moe_align.align_slots(ids, e, start, foreign, block_m=block_m)
    for name, a, b in zip(want._fields, got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: {a.tolist()} != {b.tolist()}"
    return got


@kernel_case
@pytest.mark.parametrize(
    ("t", "k", "e", "block_m"),
    [
        (1, 8, 128, 16),  # batch-1 decode: more experts than slots
        (3, 4, 8, 16),
        (17, 4, 8, 64),
        (16, 8, 160, 16),  # E_local not a power of two
        (40, 8, 128, 16),  # 320 slots: several rank chunks
        (512, 8, 256, 16),  # MAX_SLOTS slots, the largest expert count
        (512, 8, 128, 64),
    ],
)
def test_local_routings_align_like_the_torch_version(t: int, k: int, e: int, block_m: int) -> None:
    for seed in range(3):
        ids = _ids(t, k, 0, e, seed=100 * t + seed)
        _assert_same_alignment(ids, e, 0, block_m, foreign=False)


@kernel_case
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize(
    ("t", "k", "e", "start", "total"),
    [
        (9, 4, 4, 4, 16),  # ids below and above this rank's four experts
        (9, 4, 4, 0, 16),  # only above
        (9, 4, 4, 12, 16),  # only below
        (300, 8, 32, 96, 128),  # 2400 slots, the last of four ranks
    ],
)
def test_other_ranks_experts_are_dropped_like_the_torch_version(
    t: int, k: int, e: int, start: int, total: int, block_m: int
) -> None:
    for seed in range(3):
        ids = _ids(t, k, 0, total, seed=10 * t + start + seed)
        _assert_same_alignment(ids, e, start, block_m)


@kernel_case
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize(("t", "k", "e"), [(64, 8, 128), (300, 1, 4), (5, 3, 1)])
def test_one_expert_taking_every_slot_keeps_token_order(
    t: int, k: int, e: int, block_m: int
) -> None:
    ids = torch.full((t, k), e - 1, dtype=torch.long, device=DEVICE)
    got = _assert_same_alignment(ids, e, 0, block_m, foreign=False)
    slots = t * k
    groups = -(-slots // block_m) * block_m
    assert int(got.num_padded.item()) == groups
    assert got.sorted_slot_ids[:slots].tolist() == list(range(slots))


@kernel_case
def test_rank_without_routed_slots_is_all_sentinels() -> None:
    ids = _ids(5, 2, 0, 14, seed=1)
    got = _assert_same_alignment(ids, 2, 14, 16)  # experts 14, 15: nobody picked them
    assert int(got.num_padded.item()) == 0
    assert (got.sorted_slot_ids == ids.numel()).all() and (got.block_expert == 2).all()


@kernel_case
def test_decode_batches_take_the_triton_alignment(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a decode batch took the torch alignment")

    monkeypatch.setattr(fused_moe, "align_slots", refuse)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 32, generator=gen).to(DEVICE)
    w13 = torch.randn(4, 32, 32, generator=gen).to(DEVICE)  # [E, 2I, H]
    w2 = torch.randn(4, 32, 16, generator=gen).to(DEVICE)  # [E, H, I]
    ids = _ids(3, 2, 0, 4, seed=2)
    weights = torch.rand(3, 2, generator=gen).to(DEVICE)
    got = fused_moe.fused_experts(x, w13, w2, weights, ids, foreign_slots=False)
    assert got.shape == (3, 32) and torch.isfinite(got).all()


@pytest.mark.gpu
def test_alignment_replays_in_a_cuda_graph() -> None:
    ids = _ids(32, 8, 0, 128, seed=3, device="cuda")
    moe_align.align_slots_triton(ids, 128)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moe_align.align_slots_triton(ids, 128)
    for seed in (4, 5):  # fresh routings through the same graph
        ids.copy_(_ids(32, 8, 0, 128, seed=seed, device="cuda"))
        graph.replay()
        want = moe_align.align_slots(ids, 128, foreign_slots=False)
        for a, b in zip(captured, want, strict=True):
            assert torch.equal(a, b)
