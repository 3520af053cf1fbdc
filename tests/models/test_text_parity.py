"""Text-only parity of the Glimpse MoE decoder with transformers' Glm4vMoeForConditionalGeneration.

Both models load the same tiny checkpoint in float32. Logits must agree to max |diff| <= 1e-5
(observed: <= 2e-7); greedy continuations of 16 tokens, decoded step by step through the paged KV
cache with two sequences sharing each flat batch, must be identical to ``generate``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

from models.glm4v.loader import load_model
from models.layers.attention import AttentionMetadata

TOL = 1e-5  # observed ~4e-7 on logits of magnitude ~0.7
NEW_TOKENS = 16


def _hf(path: Path) -> Glm4vMoeForConditionalGeneration:
    model = Glm4vMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # always produce NEW_TOKENS tokens
    return model.eval()


def _write_ckpt(out: Path, shared_experts: int) -> Path:
    torch.manual_seed(1)
    text = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, moe_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=shared_experts,
        first_k_dense_replace=1,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=512,
        eos_token_id=[1], pad_token_id=0,
        rope_parameters=dict(
            rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1],
            partial_rotary_factor=0.5,
        ),
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=32, num_heads=2, out_hidden_size=64, image_size=56)
    config = Glm4vMoeConfig(text_config=text, vision_config=vision, image_token_id=250)
    model = Glm4vMoeForConditionalGeneration(config)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.05)
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.normal_(0.0, 0.1)  # sharper attention so positions matter
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def grouped_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers-written checkpoint exercising group-limited routing and a scaling factor."""
    return _write_ckpt(tmp_path_factory.mktemp("grouped_ckpt"), shared_experts=1)


@pytest.fixture(scope="module")
def two_shared_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same with a shared expert twice the routed width: it fills two stacked slots."""
    return _write_ckpt(tmp_path_factory.mktemp("two_shared_ckpt"), shared_experts=2)


@pytest.fixture(params=["tiny_ckpt_45", "tiny_ckpt_46", "grouped_ckpt", "two_shared_ckpt"])
def ckpt(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


def _prompts(vocab: int, lens: list[int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # stay below the special-token ids at the top of the tiny vocabularies
    return [torch.randint(3, min(vocab, 200), (n,), generator=gen) for n in lens]


def _text_positions(start: int, n: int) -> torch.Tensor:  # [3, n]
    return torch.arange(start, start + n)[None].expand(3, -1)


@torch.inference_mode()
def test_prefill_logits_match_transformers(ckpt: Path) -> None:
    hf = _hf(ckpt)
    ours = load_model(ckpt, dtype=torch.float32, device="cpu", vision=False)
    for ids in _prompts(ours.config.text.vocab_size, [1, 7, 33]):
        ref = hf(input_ids=ids[None]).logits[0]
        hidden = ours(ids, _text_positions(0, len(ids)), AttentionMetadata.prefill([len(ids)]))
        logits = ours.compute_logits(hidden)
        assert logits.dtype == torch.float32
        assert logits.shape == ref.shape
        assert (logits - ref).abs().max().item() <= TOL


@torch.inference_mode()
def test_bf16_matches_transformers_bf16(tiny_ckpt_46: Path) -> None:
    """bf16 weights and activations, float32 router and norms: within a couple of bf16 ulps."""
    hf = Glm4vMoeForConditionalGeneration.from_pretrained(tiny_ckpt_46, dtype=torch.bfloat16)
    ours = load_model(tiny_ckpt_46, dtype=torch.bfloat16, device="cpu", vision=False)
    bias = ours.language_model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32
    (ids,) = _prompts(ours.config.text.vocab_size, [24], seed=11)
    ref = hf.eval()(input_ids=ids[None]).logits[0].float()
    logits = ours.compute_logits(ours(ids, _text_positions(0, 24), AttentionMetadata.prefill([24])))
    assert logits.dtype == torch.float32
    assert (logits - ref).abs().max().item() <= 1e-2


@torch.inference_mode()
def test_flat_batch_equals_each_sequence_alone(tiny_ckpt_45: Path) -> None:
    ours = load_model(tiny_ckpt_45, dtype=torch.float32, device="cpu", vision=False)
    lens = [5, 12, 1, 9]
    prompts = _prompts(ours.config.text.vocab_size, lens, seed=3)
    alone = [
        ours.compute_logits(
            ours(p, _text_positions(0, len(p)), AttentionMetadata.prefill([len(p)]))
        )
        for p in prompts
    ]
    ids = torch.cat(prompts)
    positions = torch.cat([_text_positions(0, n) for n in lens], dim=1)
    batched = ours.compute_logits(ours(ids, positions, AttentionMetadata.prefill(lens)))
    assert torch.allclose(batched, torch.cat(alone), atol=1e-5, rtol=0)
    # a sequence must not see its neighbours: changing one prompt leaves the others unchanged
    prompts[0] = prompts[0].flip(0)
    changed = ours.compute_logits(
        ours(torch.cat(prompts), positions, AttentionMetadata.prefill(lens))
    )
    assert torch.allclose(changed[lens[0] :], batched[lens[0] :], atol=1e-5, rtol=0)
    assert not torch.allclose(changed[: lens[0]], batched[: lens[0]], atol=1e-3)


class _PagedRunner:
    """Minimal step-by-step driver: one block table per sequence, flat batches of new tokens."""

    def __init__(self, model, block_size: int = 4, num_blocks: int = 64) -> None:
        tc = model.config.text
        self.model, self.block_size = model, block_size
        for layer in model.language_model.layers:
            attn = layer.self_attn.attn
            attn.kv_cache = torch.zeros(
                2, num_blocks, block_size, attn.num_kv_heads, tc.head_dim, dtype=torch.float32
            )
        self.per_seq = num_blocks // 2

    def step(self, seqs: list[int], chunks: list[torch.Tensor], starts: list[int]) -> torch.Tensor:
        """Run new tokens ``chunks[i]`` of sequence ``seqs[i]`` whose cache holds ``starts[i]``."""
        lens = [len(c) for c in chunks]
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        seq_k = [s + n for s, n in zip(starts, lens, strict=True)]
        tables = torch.stack(
            [torch.arange(i * self.per_seq, (i + 1) * self.per_seq) for i in seqs]
        ).int()
        slots = torch.cat(
            [
                tables[i, pos // self.block_size].long() * self.block_size + pos % self.block_size
                for i, (s, n) in enumerate(zip(starts, lens, strict=True))
                for pos in [torch.arange(s, s + n)]
            ]
        )
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            seq_lens_k=torch.tensor(seq_k, dtype=torch.int32),
            max_seqlen_q=max(lens),
            max_seqlen_k=max(seq_k),
            slot_mapping=slots,
            block_tables=tables,
            seq_lens_k_cpu=seq_k,
            cu_seqlens_q_cpu=cu,
        )
        positions = torch.cat([_text_positions(s, n) for s, n in zip(starts, lens, strict=True)], 1)
        hidden = self.model(torch.cat(chunks), positions, meta)
        last = torch.tensor(cu[1:]) - 1
        return self.model.compute_logits(hidden[last])  # [B, V] logits of each last token


@torch.inference_mode()
def test_greedy_continuation_matches_generate(ckpt: Path) -> None:
    hf = _hf(ckpt)
    ours = load_model(ckpt, dtype=torch.float32, device="cpu", vision=False)
    prompts = _prompts(ours.config.text.vocab_size, [11, 6], seed=7)
    expected = [
        hf.generate(p[None], max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p) :].tolist()
        for p in prompts
    ]
    runner = _PagedRunner(ours)
    # chunked prefill of the first prompt beside a whole prefill of the second
    whole = runner.step([0, 1], [prompts[0][:5], prompts[1]], [0, 0])
    rest = runner.step([0], [prompts[0][5:]], [5])
    generated = [[int(rest[0].argmax())], [int(whole[1].argmax())]]
    lens = [len(p) for p in prompts]
    for _ in range(NEW_TOKENS - 1):
        chunks = [torch.tensor([g[-1]]) for g in generated]
        starts = [n + len(g) - 1 for n, g in zip(lens, generated, strict=True)]
        logits = runner.step([0, 1], chunks, starts)
        for g, row in zip(generated, logits, strict=True):
            g.append(int(row.argmax()))
    assert generated == expected
