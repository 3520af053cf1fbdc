"""Attention over the paged KV cache: the batched decode path and the per-sequence path against a
float64 softmax reference written here, on random caches, block tables and context lengths.

GQA is checked with 4 query heads per KV head; block tables are shuffled and padded the way the
model runner pads them (zeros past a sequence's last block), and every cache slot outside a
sequence's context holds 1e3-scale values, so a path that reads past the context would show.
"""

from __future__ import annotations

import sys

import pytest
import torch

from models.layers import attention
from models.layers.attention import Attention, AttentionMetadata, is_pure_decode

HQ, HK, D, BLOCK, NUM_BLOCKS = 8, 2, 16, 4, 96


def _layer(meta: AttentionMetadata, seed: int, dtype: torch.dtype = torch.float32) -> Attention:
    """A layer whose cache holds N(0, 1) k/v at each sequence's cached prefix and 1e3-scale
    garbage everywhere else (other sequences' slots, block padding, free blocks)."""
    layer = Attention(HQ, HK, D, scale=D**-0.5)
    gen = torch.Generator().manual_seed(seed)
    cache = 1e3 * torch.randn(2, NUM_BLOCKS * BLOCK, HK, D, generator=gen)
    for i in range(len(meta.cu_seqlens_q_cpu) - 1):
        n_prefix = meta.seq_lens_k_cpu[i] - (
            meta.cu_seqlens_q_cpu[i + 1] - meta.cu_seqlens_q_cpu[i]
        )
        slots = _slots(meta.block_tables[i], torch.arange(n_prefix))
        cache[:, slots] = torch.randn(2, n_prefix, HK, D, generator=gen)
    layer.kv_cache = cache.view(2, NUM_BLOCKS, BLOCK, HK, D).to(dtype)
    return layer


def _slots(table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # [n] int64 cache slots
    return table[pos // BLOCK].long() * BLOCK + pos % BLOCK


def _tables(lens_k: list[int], seed: int) -> torch.Tensor:  # [B, max_blocks] int32, zero-padded
    need = [(n + BLOCK - 1) // BLOCK for n in lens_k]
    perm = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = torch.zeros(len(lens_k), max(need), dtype=torch.int32)
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    return tables


def _meta(lens_q: list[int], lens_k: list[int], tables: torch.Tensor) -> AttentionMetadata:
    cu = [0]
    for n in lens_q:
        cu.append(cu[-1] + n)
    slots = []
    for i, (n_q, n_k) in enumerate(zip(lens_q, lens_k, strict=True)):
        slots.append(_slots(tables[i], torch.arange(n_k - n_q, n_k)))
    return AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens_k=torch.tensor(lens_k, dtype=torch.int32),
        max_seqlen_q=max(lens_q),
        max_seqlen_k=max(lens_k),
        slot_mapping=torch.cat(slots),
        block_tables=tables,
        seq_lens_k_cpu=list(lens_k),
        cu_seqlens_q_cpu=cu,
    )


def _reference(layer, q, k_new, v_new, meta) -> torch.Tensor:  # [T, HQ, D] float64
    """Softmax attention per sequence, context = cached prefix (read slot by slot) + new k/v."""
    cache = layer.kv_cache.double()
    cu, lens_k = meta.cu_seqlens_q_cpu, meta.seq_lens_k_cpu
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(len(cu) - 1):
        s, e = cu[i], cu[i + 1]
        n_q, n_k = e - s, lens_k[i]
        slots = _slots(meta.block_tables[i], torch.arange(n_k - n_q))
        old_k = cache[0].reshape(-1, HK, D)[slots]
        old_v = cache[1].reshape(-1, HK, D)[slots]
        ks = torch.cat([old_k, k_new[s:e].double()]).repeat_interleave(HQ // HK, dim=1)
        vs = torch.cat([old_v, v_new[s:e].double()]).repeat_interleave(HQ // HK, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].double(), ks) * D**-0.5
        visible = torch.arange(n_k)[None, :] <= torch.arange(n_k - n_q, n_k)[:, None]
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[s:e] = torch.einsum("hqk,khd->qhd", probs, vs)
    return out


def _inputs(t: int, seed: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(t, h, D, generator=gen).to(dtype) for h in (HQ, HK, HK))


@pytest.mark.parametrize("lens_k", [[1], [5, 1, 17, 9], [4, 8, 33, 2, 12, 12, 7, 64]])
def test_batched_decode_matches_softmax_reference(lens_k: list[int]) -> None:
    meta = _meta([1] * len(lens_k), lens_k, _tables(lens_k, seed=1))
    layer = _layer(meta, seed=len(lens_k))
    q, k, v = _inputs(len(lens_k), seed=2)
    assert is_pure_decode(q.shape[0], meta)
    want = _reference(layer, q, k, v, meta)
    calls = []
    original = layer._sdpa_per_sequence
    layer._sdpa_per_sequence = lambda *a: calls.append(a) or original(*a)
    got = layer(q, k, v, meta).view(-1, HQ, D)
    assert not calls  # one batched SDPA, no loop over sequences
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    # the per-sequence path, given the same decode batch, agrees with the batched one
    per_seq = original(q, k, v, meta)
    torch.testing.assert_close(got.view(-1, HQ, D), per_seq, rtol=0, atol=1e-6)


def test_mixed_prefill_chunks_and_decode_tokens_match_reference(monkeypatch) -> None:
    lens_q = [6, 1, 9, 1, 3]  # a fresh prompt, decodes and chunks continuing a cached prefix
    lens_k = [6, 14, 21, 3, 3]
    meta = _meta(lens_q, lens_k, _tables(lens_k, seed=4))
    layer = _layer(meta, seed=3)
    q, k, v = _inputs(sum(lens_q), seed=5)
    assert not is_pure_decode(q.shape[0], meta)
    want = _reference(layer, q, k, v, meta)
    got = layer(q, k, v, meta).view(-1, HQ, D)  # CPU default: every sequence on its own
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    meta._decode_rows = None
    batches = _spy_decode(layer, monkeypatch)
    got = layer(q, k, v, meta).view(-1, HQ, D)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    assert batches == [2]  # the two one-token sequences (rows 6 and 16) in one decode batch


def _spy_decode(layer: Attention, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the batch size of every decode-path call the layer makes, batching the decode
    rows of mixed batches on the CPU as on CUDA."""
    monkeypatch.setattr(attention, "_batch_decodes", lambda q: True)
    sizes: list[int] = []
    original = layer._decode
    layer._decode = lambda q, meta: sizes.append(q.shape[0]) or original(q, meta)
    return sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("lens_q", "lens_k"),
    [
        # the scheduler's order: running decodes first (rows by a slice), then chunks and prompts
        ([1, 1, 1, 1, 8, 5], [9, 40, 2, 17, 8, 29]),
        # a new one-token prompt after the prefills (rows by an index)
        ([1, 1, 1, 1, 8, 5, 1], [9, 40, 2, 17, 8, 29, 1]),
    ],
    ids=["slice", "index"],
)
def test_running_decodes_ahead_of_prefills_attend_in_one_batch(
    lens_q: list[int], lens_k: list[int], dtype: torch.dtype, monkeypatch
) -> None:
    meta = _meta(lens_q, lens_k, _tables(lens_k, seed=21))
    layer = _layer(meta, seed=20, dtype=dtype)
    q, k, v = _inputs(sum(lens_q), seed=22, dtype=dtype)
    want = _reference(layer, q, k, v, meta)
    batches = _spy_decode(layer, monkeypatch)
    got = layer(q, k, v, meta).view(-1, HQ, D)
    atol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)
    assert batches == [lens_q.count(1)]
    rows = meta._decode_rows.rows
    assert isinstance(rows, slice) == (lens_q[-1] != 1)
    # a second layer of the same step reuses the batch the first one built
    built = meta._decode_rows
    layer(q, k, v, meta)
    assert meta._decode_rows is built and batches == [lens_q.count(1)] * 2


def test_a_lone_decode_among_prefills_runs_with_them(monkeypatch) -> None:
    lens_q, lens_k = [1, 6], [12, 6]
    meta = _meta(lens_q, lens_k, _tables(lens_k, seed=24))
    layer = _layer(meta, seed=23)
    q, k, v = _inputs(sum(lens_q), seed=25)
    batches = _spy_decode(layer, monkeypatch)
    got = layer(q, k, v, meta).view(-1, HQ, D)
    torch.testing.assert_close(got.double(), _reference(layer, q, k, v, meta), rtol=0, atol=1e-5)
    assert batches == []  # one sequence gains nothing from a batch of its own


def test_cache_free_prefill_is_causal_per_sequence() -> None:
    lens = [7, 1, 12]
    layer = Attention(HQ, HK, D, scale=D**-0.5)
    q, k, v = _inputs(sum(lens), seed=6)
    meta = AttentionMetadata.prefill(lens)
    got = layer(q, k, v, meta).view(-1, HQ, D)
    # same maths as a paged batch whose whole context is new: reuse the reference on an
    # all-new context (the cache is never read because no prefix is cached)
    paged = _meta(lens, lens, _tables(lens, seed=7))
    want = _reference(_layer(paged, seed=8), q, k, v, paged)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_decode_in_bfloat16_stays_close_to_reference() -> None:
    lens_k = [3, 40, 17, 1]
    meta = _meta([1] * 4, lens_k, _tables(lens_k, seed=10))
    layer = _layer(meta, seed=9, dtype=torch.bfloat16)
    q, k, v = _inputs(4, seed=11, dtype=torch.bfloat16)
    got = layer(q, k, v, meta).view(-1, HQ, D)
    want = _reference(layer, q, k, v, meta)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-2)


@pytest.mark.gpu
def test_cuda_bf16_decode_matches_per_sequence_path() -> None:
    lens_k = [1, 130, 17, 64, 5]
    meta = _meta([1] * 5, lens_k, _tables(lens_k, seed=13))
    layer = _layer(meta, seed=12, dtype=torch.bfloat16)
    layer.kv_cache = layer.kv_cache.cuda()
    meta.cu_seqlens_q, meta.seq_lens_k = meta.cu_seqlens_q.cuda(), meta.seq_lens_k.cuda()
    meta.slot_mapping, meta.block_tables = meta.slot_mapping.cuda(), meta.block_tables.cuda()
    q, k, v = (x.cuda() for x in _inputs(5, seed=14, dtype=torch.bfloat16))
    layer._write_cache(k, v, meta.slot_mapping)
    got = layer._sdpa_decode(q, meta)
    want = layer._sdpa_per_sequence(q, k, v, meta)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2)


@pytest.mark.gpu
def test_cuda_bf16_mixed_batch_decodes_on_the_kernel_match_the_reference(monkeypatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "BLOCK", 16)  # the kernel needs 16-token blocks
    lens_q = [1, 1, 1, 12, 1]
    lens_k = [130, 17, 64, 40, 5]
    meta = _meta(lens_q, lens_k, _tables(lens_k, seed=31))
    layer = _layer(meta, seed=30, dtype=torch.bfloat16)
    q, k, v = _inputs(sum(lens_q), seed=32, dtype=torch.bfloat16)
    want = _reference(layer, q, k, v, meta)
    layer.kv_cache = layer.kv_cache.cuda()
    meta.cu_seqlens_q, meta.seq_lens_k = meta.cu_seqlens_q.cuda(), meta.seq_lens_k.cuda()
    meta.slot_mapping, meta.block_tables = meta.slot_mapping.cuda(), meta.block_tables.cuda()
    kernel_calls = []
    original = layer._paged_decode
    layer._paged_decode = lambda q, m: kernel_calls.append(q.shape[0]) or original(q, m)
    got = layer(q.cuda(), k.cuda(), v.cuda(), meta).view(-1, HQ, D)
    assert kernel_calls == [4]
    torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=3e-2)
