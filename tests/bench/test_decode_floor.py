"""The decode benchmark's HBM floor arithmetic against an independent count from the model.

``step_bytes`` is closed-form arithmetic on the config; here the same quantities are summed from
the parameters of Glimpse's model built on the meta device (no memory), for the tiny widths and
the real GLM-4.5V widths, and the expected-distinct-experts formula is checked by simulation.
"""

from __future__ import annotations

import pytest
import torch

from bench.decode_bench import bench_model_config, expected_experts, step_bytes
from models.glm4v.model import Glm4vMoeForCausalLM
from models.layers.attention import Attention


def _counted(model: Glm4vMoeForCausalLM, batch: int, context: int, experts_read: float):
    """(layers, experts, head, kv) bytes a decode step reads, from the parameters themselves."""
    lm = model.language_model
    layers = experts = 0.0
    for name, p in lm.named_parameters():
        if name in ("embed_tokens.weight", "norm.weight"):
            continue
        if ".mlp.experts." in name:
            # stacked [E routed + S shared, ...]: of the routed slots only the used ones count;
            # the shared slots are read every step
            slot = p.nbytes / p.shape[0]
            shared = p.shape[0] - model.config.text.n_routed_experts
            experts += slot * experts_read
            layers += slot * shared
        else:
            layers += p.nbytes
    row = lm.embed_tokens.weight.nbytes / lm.embed_tokens.weight.shape[0]
    head = model.lm_head.weight.nbytes + lm.norm.weight.nbytes + batch * row
    elem = lm.embed_tokens.weight.element_size()
    per_token = sum(
        2 * m.num_kv_heads * m.head_dim for m in model.modules() if isinstance(m, Attention)
    )
    return layers, experts, head, per_token * batch * context * elem


@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "glm45v-6-layers"])
@pytest.mark.parametrize("batch, experts", [(1, "topk"), (32, "all"), (32, "expected")])
def test_step_bytes_match_the_model_parameters(tiny: bool, batch: int, experts: str) -> None:
    cfg = bench_model_config(6, tiny)
    tc = cfg.text
    with torch.device("meta"):
        model = Glm4vMoeForCausalLM(cfg, torch.bfloat16, vision=False)
    read = {
        "topk": tc.num_experts_per_tok,
        "all": tc.n_routed_experts,
        "expected": expected_experts(tc.n_routed_experts, tc.num_experts_per_tok, batch),
    }[experts]
    context = 600
    got = step_bytes(tc, batch, context, read, weight_bytes=2)
    want = _counted(model, batch, context, read)
    assert got.layers == pytest.approx(want[0], rel=1e-12)
    assert got.experts == pytest.approx(want[1], rel=1e-12)
    assert got.head == pytest.approx(want[2], rel=1e-12)
    assert got.kv == pytest.approx(want[3], rel=1e-12)
    assert got.total == pytest.approx(sum(want), rel=1e-12)


def test_real_widths_batch1_reads_top8_experts_of_the_moe_layers_and_lm_head() -> None:
    # 6 layers: layer 0 dense, 5 MoE layers, each reading 8 experts of 3 [1408 x 4096] bf16
    # matrices; the lm_head is [151552 x 4096] bf16 (+ final norm and one embedding row).
    tc = bench_model_config(6, False).text
    b1 = step_bytes(tc, 1, 512, tc.num_experts_per_tok, 2)
    assert b1.experts == 5 * 8 * 3 * 1408 * 4096 * 2
    assert b1.head == (151552 + 1 + 1) * 4096 * 2
    assert b1.kv == 512 * 6 * 2 * 8 * 128 * 2
    batch32_all = step_bytes(tc, 32, 512, tc.n_routed_experts, 2)
    assert batch32_all.experts == 16 * b1.experts


@pytest.mark.parametrize("experts, top_k, batch", [(128, 8, 32), (128, 8, 1), (4, 2, 4)])
def test_expected_experts_matches_simulated_routing(experts: int, top_k: int, batch: int) -> None:
    gen = torch.Generator().manual_seed(0)
    trials = 4000
    chosen = torch.rand(trials, batch, experts, generator=gen).topk(top_k, dim=-1).indices
    hit = torch.zeros(trials, experts).scatter_(1, chosen.reshape(trials, -1), 1.0)
    simulated = hit.sum(dim=1).mean().item()
    assert expected_experts(experts, top_k, batch) == pytest.approx(simulated, abs=0.15)
