"""Work the text decoder's layers share within one step: M-RoPE cos/sin computed once and
applied in place, and the decode attention's gather plan built once per ``AttentionMetadata``.

Checked against references written here: the out-of-place rotate-half formula, a float64 softmax
over each sequence's context, and a separate metadata object for every layer (no sharing).
"""

from __future__ import annotations

import torch

from models.layers.attention import Attention, AttentionMetadata, decode_plan
from models.layers.rotary import MRotaryEmbedding

HQ, HK, D, BLOCK, NUM_BLOCKS = 4, 2, 16, 4, 64


def _rotate_reference(x: torch.Tensor, pos: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Out-of-place M-RoPE from the definition: frequency j of the t/h/w section it falls in."""
    sections = (2, 1, 1)
    half = rotary_dim // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    src = torch.repeat_interleave(torch.arange(3), torch.tensor(sections))  # [half]
    angle = pos.float()[src].t() * inv_freq  # [T, half]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    x1, x2 = x[..., :half], x[..., half:rotary_dim]
    rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rot, x[..., rotary_dim:]), dim=-1)


def test_in_place_rotation_matches_the_out_of_place_formula_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(0)
    rope_dim = 8
    rotary = MRotaryEmbedding(D, rope_dim, 10000.0, (2, 1, 1))
    t = 9
    pos = torch.stack([torch.arange(t) + 3, torch.arange(t) // 2, torch.arange(t) % 4])
    x = torch.randn(t, HQ + HK, D, generator=gen)
    want = _rotate_reference(x, pos, rope_dim)
    rope = rotary(pos)  # computed once, reused for q and k
    q, k = rotary.apply(x[:, :HQ], x[:, HQ:], rope)
    assert torch.equal(torch.cat((q, k), 1), want)
    got = x.clone()
    rotary.apply_(got, rope)
    assert torch.equal(got, want)
    assert torch.equal(got[..., rope_dim:], x[..., rope_dim:])  # the rest passes through
    assert not torch.equal(got[..., :rope_dim], x[..., :rope_dim])


def _meta(lens_k: list[int], seed: int) -> AttentionMetadata:
    """Pure decode metadata: shuffled, zero-padded block tables, one new token per sequence."""
    perm = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
    need = [(n + BLOCK - 1) // BLOCK for n in lens_k]
    tables = torch.zeros(len(lens_k), max(need), dtype=torch.int32)
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    last = torch.tensor(lens_k) - 1
    slots = tables[torch.arange(len(lens_k)), last // BLOCK].long() * BLOCK + last % BLOCK
    return AttentionMetadata(
        cu_seqlens_q=torch.arange(len(lens_k) + 1, dtype=torch.int32),
        seq_lens_k=torch.tensor(lens_k, dtype=torch.int32),
        max_seqlen_q=1,
        max_seqlen_k=max(lens_k),
        slot_mapping=slots,
        block_tables=tables,
        seq_lens_k_cpu=list(lens_k),
        cu_seqlens_q_cpu=list(range(len(lens_k) + 1)),
    )


def _reference(cache: torch.Tensor, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """float64 softmax of each query over its sequence's context, read slot by slot."""
    flat = cache.double().view(2, -1, HK, D)
    out = []
    for i, n in enumerate(meta.seq_lens_k_cpu):
        pos = torch.arange(n)
        slots = meta.block_tables[i, pos // BLOCK].long() * BLOCK + pos % BLOCK
        ks = flat[0, slots].repeat_interleave(HQ // HK, 1)  # [n, HQ, D]
        vs = flat[1, slots].repeat_interleave(HQ // HK, 1)
        probs = (torch.einsum("hd,khd->hk", q[i].double(), ks) * D**-0.5).softmax(-1)
        out.append(torch.einsum("hk,khd->hd", probs, vs))
    return torch.stack(out)


def test_layers_of_one_step_share_one_decode_plan_and_stay_exact() -> None:
    gen = torch.Generator().manual_seed(1)
    lens_k = [5, 1, 17, 9, 12]
    meta = _meta(lens_k, seed=3)
    layers = []
    for _ in range(3):  # different caches, one metadata object, as in a model step
        layer = Attention(HQ, HK, D, scale=D**-0.5)
        layer.kv_cache = 1e2 * torch.randn(2, NUM_BLOCKS, BLOCK, HK, D, generator=gen)
        layers.append(layer)
    plans = []
    for layer in layers:
        q, k, v = (torch.randn(len(lens_k), h, D, generator=gen) for h in (HQ, HK, HK))
        got = layer(q, k, v, meta).view(-1, HQ, D)
        plans.append(meta._decode_plan)
        alone = layer(q, k, v, _meta(lens_k, seed=3)).view(-1, HQ, D)  # fresh metadata
        assert torch.equal(got, alone)
        want = _reference(layer.kv_cache, q, meta)
        # values are ~1e2 (the cache is 1e2 * randn): float32 rounding is ~1e-5 of that
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)
    assert plans[0] is not None and all(p is plans[0] for p in plans)
    # the next step's metadata (longer contexts) gets its own plan
    longer = _meta([n + 1 for n in lens_k], seed=3)
    assert decode_plan(longer, BLOCK, torch.device("cpu")) is not plans[0]
    assert longer._decode_plan.keep.sum().item() == sum(lens_k) + len(lens_k)
