"""The model runner's step inputs against a token-by-token reference, and the KV write paths.

A random schedule (chunked prefills that cut images and video frame groups, decodes, requests
joining and leaving, more requests than the first buffer rows and longer tables than its first
columns) is fed to ``ModelRunner.prepare_inputs``; every array must equal what a plain per-token
loop derives from the same slices. Also: a padded token's KV lands in the scratch block only,
and block tables handed to a step do not change when the request grows later.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

from decoder_service.engine.input_buffers import StagingBuffer
from decoder_service.engine.kv_cache_manager import KVCacheManager
from decoder_service.engine.model_runner import ModelRunner
from decoder_service.engine.request import MediaRef, Request
from decoder_service.engine.sampling_params import SamplingParams
from decoder_service.engine.scheduler import NewRequestData, ScheduledSequence, SchedulerOutput
from models.layers.attention import Attention, AttentionMetadata

BS = 4  # tokens per block: small, so tables grow past the runner's first columns
HIDDEN = 6


class _AttentionOnly(torch.nn.Module):
    """Enough of a model for the runner: a parameter (device, dtype) and one attention layer."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.attn = Attention(num_heads=4, num_kv_heads=2, head_dim=8, scale=1.0)


@dataclass
class _Sim:
    """One request as the scheduler would see it."""

    rid: str
    tokens: list[int]
    num_prompt: int
    table: torch.Tensor | None  # [3, num_prompt] int64
    delta: int
    media: list[MediaRef]
    blocks: list[int] = field(default_factory=list)
    computed: int = 0


def _new_sim(rng: random.Random, rid: str) -> _Sim:
    p = rng.randint(3, 90)
    media: list[MediaRef] = []
    if p > 12 and rng.random() < 0.6:
        a = rng.randint(1, p - 10)
        spans = ((a, a + 3), (a + 5, a + 9)) if rng.random() < 0.5 else ((a, a + 8),)
        media.append(MediaRef(f"h{rid}", spans))
    table = None
    if rng.random() < 0.7:
        table = torch.tensor([[rng.randint(0, 200) for _ in range(p)] for _ in range(3)])
    tokens = [rng.randint(0, 999) for _ in range(p)]
    return _Sim(rid, tokens, p, table, rng.randint(-20, 20), media)


def _reference(sims: dict[str, _Sim], seqs: list[ScheduledSequence], embeds) -> dict:
    """Token by token, straight from the definitions."""
    ids, pos, slots, mask, rows, cu, lens_k, logits = [], [], [], [], [], [0], [], []
    for seq in seqs:
        s = sims[seq.request_id]
        for j, p in enumerate(range(seq.start, seq.start + len(seq.token_ids))):
            ids.append(seq.token_ids[j])
            if p < s.num_prompt and s.table is not None:
                pos.append(s.table[:, p].tolist())
            else:
                pos.append([p + (s.delta if p >= s.num_prompt else 0)] * 3)
            slots.append(seq.block_ids[p // BS] * BS + p % BS)
            hit = None
            for k, item in enumerate(s.media):
                first = 0
                for a, b in item.spans:
                    if a <= p < b:
                        hit = embeds[(seq.request_id, k)][first + p - a]
                    first += b - a
            mask.append(hit is not None)
            if hit is not None:
                rows.append(hit)
        cu.append(len(ids))
        lens_k.append(seq.start + len(seq.token_ids))
        if seq.sample:
            logits.append(len(ids) - 1)
    return dict(ids=ids, pos=pos, slots=slots, mask=mask, rows=rows, cu=cu, lens_k=lens_k,
                logits=logits)  # fmt: skip


def _check(step, want: dict, seqs: list[ScheduledSequence]) -> None:
    meta = step.meta
    assert step.input_ids.tolist() == want["ids"]
    assert step.positions.dtype == torch.int64 and step.input_ids.dtype == torch.int64
    assert step.positions.t().tolist() == want["pos"]
    assert meta.slot_mapping.tolist() == want["slots"]
    assert meta.cu_seqlens_q.tolist() == want["cu"] == meta.cu_seqlens_q_cpu
    assert meta.seq_lens_k.tolist() == want["lens_k"] == meta.seq_lens_k_cpu
    assert meta.max_seqlen_k == max(want["lens_k"])
    assert meta.max_seqlen_q == max(
        b - a for a, b in zip(want["cu"][:-1], want["cu"][1:], strict=True)
    )
    rows = step.logits_indices
    if isinstance(rows, slice):  # the first rows, as a view
        assert rows.start == 0 and len(seqs) == len(want["ids"]) == rows.stop
        rows = torch.arange(rows.stop)
    assert rows.tolist() == want["logits"]
    assert meta.block_tables.dtype == torch.int32
    for i, seq in enumerate(seqs):
        assert meta.block_tables[i, : len(seq.block_ids)].tolist() == seq.block_ids
    if any(want["mask"]):
        assert step.mm_mask.tolist() == want["mask"]
        torch.testing.assert_close(step.mm_embeds, torch.stack(want["rows"]), rtol=0, atol=0)
    else:
        assert step.mm_embeds is None and step.mm_mask is None


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "staged"])
@pytest.mark.parametrize("seed", [0, 1])
def test_step_inputs_equal_a_per_token_reference(seed: int, staged: bool) -> None:
    rng = random.Random(seed)
    embeds: dict[tuple[str, int], torch.Tensor] = {}
    runner = ModelRunner(_AttentionOnly(), BS, lambda rid, k: embeds[(rid, k)])
    if staged:  # the one-copy path a GPU takes, into a second CPU buffer
        runner.staging = StagingBuffer(torch.device("cpu"), always_copy=True)
    free_blocks = list(range(5000))
    rng.shuffle(free_blocks)
    sims: dict[str, _Sim] = {}
    dropped: list[str] = []
    for step_no in range(40):
        out = SchedulerOutput(dropped_request_ids=dropped)
        dropped = []
        while len(sims) < 14 and rng.random() < 0.5:
            s = _new_sim(rng, f"r{step_no}-{len(sims)}")
            sims[s.rid] = s
            for k, item in enumerate(s.media):
                embeds[(s.rid, k)] = torch.randn(item.num_embeds, HIDDEN)
            params = SamplingParams(temperature=0.0)
            out.new_requests.append(
                NewRequestData(s.rid, s.tokens[:], [], s.media, s.table, s.delta, params)
            )
        for s in sims.values():
            left = len(s.tokens) - s.computed
            n = 1 if left == 1 else rng.randint(1, left)
            end = s.computed + n
            while len(s.blocks) * BS < end:
                s.blocks.append(free_blocks.pop())
            seq = ScheduledSequence(
                s.rid, s.tokens[s.computed : end], s.computed, s.blocks[:], end == len(s.tokens)
            )
            out.sequences.append(seq)
        runner._update_states(out)
        if not out.sequences:
            continue
        step = runner.prepare_inputs(out)
        _check(step, _reference(sims, out.sequences, embeds), out.sequences)
        for seq in out.sequences:
            s = sims[seq.request_id]
            s.computed = seq.start + len(seq.token_ids)
            if seq.sample:  # the sampled token comes back in the next slice
                s.tokens.append(rng.randint(0, 999))
            # the sampler's view: every generated token the runner was given so far
            assert (
                runner.states[s.rid].sampling.output_token_ids
                == s.tokens[s.num_prompt : s.computed]
            )
        for rid in [r for r in sims if rng.random() < 0.1]:
            dropped.append(rid)
            del sims[rid]
    assert runner.tables.ids.shape[0] > 8 and runner.tables.ids.shape[1] > 16  # buffers grew


def test_padded_tokens_write_only_the_scratch_block() -> None:
    runner = ModelRunner(_AttentionOnly(), BS, lambda rid, k: torch.empty(0))
    runner.allocate_kv_cache(3)
    layer = runner.model.attn
    assert layer.kv_cache.shape[1] == 4 and runner.pad_slot == 3 * BS
    k = torch.randn(4, 2, 8)
    v = torch.randn(4, 2, 8)
    slots = torch.tensor([5, runner.pad_slot, 9, runner.pad_slot])
    meta = AttentionMetadata(
        torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32),
        torch.ones(4, dtype=torch.int32),
        1,
        1,
        slots,
        torch.zeros(4, 1, dtype=torch.int32),
    )
    layer._write_cache(k, v, meta.slot_mapping)
    flat_k = layer.kv_cache[0].reshape(-1, 2, 8)
    flat_v = layer.kv_cache[1].reshape(-1, 2, 8)
    torch.testing.assert_close(flat_k[[5, 9]], k[[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(flat_v[[5, 9]], v[[0, 2]], rtol=0, atol=0)
    real = [i for i in range(3 * BS) if i not in (5, 9)]
    assert flat_k[real].abs().sum() == 0 and flat_v[real].abs().sum() == 0


def test_block_table_of_a_step_is_a_snapshot() -> None:
    kv = KVCacheManager(16, BS)
    req = Request("a", list(range(6)), SamplingParams())
    assert kv.allocate(req, 6)
    first = kv.block_ids("a")
    req.num_computed_tokens = 6
    assert kv.allocate(req, 4)  # 10 tokens: a third block
    assert len(first) == 2 and len(kv.block_ids("a")) == 3
    assert kv.block_ids("a")[:2] == first


def test_blocks_filled_while_decoding_are_found_by_a_later_prompt() -> None:
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    req = Request("a", list(range(6)), SamplingParams())
    assert kv.allocate(req, 6)
    req.num_computed_tokens = 6
    for t in range(100, 106):  # decode one token at a time through the second block's end
        req.append_output_token(t)
        assert kv.allocate(req, 1)
        req.num_computed_tokens += 1
    later = Request("b", req.all_token_ids + [7], SamplingParams())
    assert kv.find_cached_prefix(later).num_tokens == 3 * BS
