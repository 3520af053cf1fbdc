"""``LoadedTower.reserve_memory``: the encoder's GPU peak is taken before it reports SERVING."""

from __future__ import annotations

import pytest
import torch

from encoder_service.config import ModelLoad
from encoder_service.tower import load_tower

MIB = 1 << 20


def test_reserve_memory_does_nothing_on_the_cpu(tiny_ckpt_45):
    tower = load_tower(ModelLoad(str(tiny_ckpt_45), device="cpu", dtype="float32"))
    assert tower.reserve_memory(4096, 64 * MIB) == 0


@pytest.mark.gpu
def test_a_full_budget_encode_after_the_reservation_grows_nothing(tiny_ckpt_45):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    tower = load_tower(ModelLoad(str(tiny_ckpt_45), device="cuda", dtype="bfloat16"))
    budget, extra = 16384, 256 * MIB
    before = torch.cuda.memory_reserved()
    reserved = tower.reserve_memory(budget, extra)
    assert reserved == torch.cuda.memory_reserved()
    assert reserved - before >= extra  # the cache's share stays held
    # a batch at the budget (photo-sized images) and a cache's worth of embeddings fit in it
    grids = torch.tensor([(1, 64, 64)] * (budget // 4096), dtype=torch.int64)
    raw = torch.randint(0, 256, (budget, tower.model_config.vision.patch_dim), dtype=torch.uint8)
    held = torch.empty(extra, dtype=torch.uint8, device="cuda")
    out = tower.encode(raw, grids)
    torch.cuda.synchronize()
    assert out.shape[0] == budget // 4
    # different image shapes may split blocks differently: a little slack, never the cache's size
    assert torch.cuda.memory_reserved() - reserved <= 32 * MIB
    del held
