"""The paged decode kernel with a fixed split count (what CUDA graphs launch) and the attention
layer's decode path inside a captured graph.

Fixed splits: against the torch reference, with many more splits than a short context has pages
(empty splits must weigh nothing, even over uninitialised partials), with splits that end inside
a tile (the tile's later pages belong to the next split), with all 32 splits busy on a long
context, and per-sequence results that do not depend on the batch around them. On CPU these run under Triton's interpreter in a fresh
process (see ``test_paged_attention.py`` for why). GPU: one captured graph of the layer's cache
write + decode kernel, replayed with new contexts, lengths and block tables each time, against the
reference; and the layer's Triton and SDPA decode paths on the same bfloat16 cache.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import CAN_RUN, DEVICE, interpreter_test, kernel_case

from models.layers.attention import Attention, AttentionMetadata

pytest.importorskip("triton")


test_cases_pass_under_the_interpreter = interpreter_test(__file__)

if CAN_RUN:
    from kernels import paged_attention as kernel


def _case(lens: list[int], hq: int, hk: int, d: int, block: int, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    need = [(n + block - 1) // block for n in lens]
    num_blocks = sum(need) + 2
    cache = torch.randn(2, num_blocks, block, hk, d, generator=gen).to(DEVICE, dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(lens), max(need) + 2), 10**7, dtype=torch.int32)  # never read
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used : used + n].int()
        used += n
    q = torch.randn(len(lens), hq, d, generator=gen).to(DEVICE, dtype)
    return q, cache, tables.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)


@kernel_case
@pytest.mark.parametrize(
    ("lens", "splits", "partition"),
    [
        ([1, 2], 8, 16),
        ([16, 17, 5, 100], 4, 16),
        ([300, 1, 64], 3, 32),
        ([130], 16, 16),
        ([300, 20], 3, 16),  # 7 pages a split: its second tile straddles the next split's start
        ([20, 5, 64], 32, 16),  # 32 splits over 4 pages at most: 28 or more splits empty
        ([1500, 3], 32, 16),  # 94 pages: 32 busy splits of 3 pages, each a tile cut by its end
    ],
)
def test_fixed_splits_match_reference(lens: list[int], splits: int, partition: int) -> None:
    q, cache, tables, seq_lens = _case(lens, 8, 2, 32, 16, torch.float32, seed=sum(lens))
    args = (q, cache[0], cache[1], tables, seq_lens)
    # max_seqlen_k is ignored with num_splits: pass a wrong one to show it
    got = kernel.paged_decode_attention(*args, 1, 0.2, partition=partition, num_splits=splits)
    want = kernel.paged_decode_reference(*args, 0.2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@kernel_case
def test_fixed_splits_give_each_sequence_the_same_result_in_any_batch() -> None:
    lens = [70, 3, 250, 33]
    q, cache, tables, seq_lens = _case(lens, 8, 2, 32, 16, torch.float32, seed=9)
    splits = kernel.splits_for_context(4096, partition=32)
    batch = kernel.paged_decode_attention(
        q, cache[0], cache[1], tables, seq_lens, 0, 0.3, partition=32, num_splits=splits
    )
    for i in range(len(lens)):
        alone = kernel.paged_decode_attention(
            q[i : i + 1], cache[0], cache[1], tables[i : i + 1], seq_lens[i : i + 1], 0, 0.3,
            partition=32, num_splits=splits,
        )  # fmt: skip
        assert torch.equal(alone[0], batch[i])


def test_split_count_is_a_function_of_the_longest_context_only() -> None:
    from kernels.paged_attention import MAX_SPLITS, splits_for_context

    # one split per 64 tokens of the longest context, at most MAX_SPLITS: a 540-token engine
    # launches 9 splits, anything from 2048 tokens up 32
    assert splits_for_context(1) == 1 and splits_for_context(64) == 1
    assert splits_for_context(540) == 9 and splits_for_context(600) == 10
    assert splits_for_context(2048) == MAX_SPLITS == 32 and splits_for_context(10**6) == 32
    assert splits_for_context(513, partition=512) == 2


# ---- GPU --------------------------------------------------------------------------------------

HQ, HK, D, BLOCK, NUM_BLOCKS, MAX_LEN, B = 12, 2, 128, 16, 800, 2048, 6


def _fill(gen, static: dict[str, torch.Tensor], cache_blocks: int) -> None:
    """New random step inputs written into the captured tensors in place."""
    lens = torch.randint(1, MAX_LEN + 1, (B,), generator=gen)
    lens[0] = 1
    perm = torch.randperm(cache_blocks, generator=gen)[: static["tables"].numel()]
    static["tables"].copy_(perm.view(B, -1).int())
    static["lens"].copy_(lens.int())
    pos = lens - 1  # the new token is each sequence's last
    blocks = static["tables"].cpu().long().gather(1, (pos // BLOCK)[:, None])[:, 0]
    static["slots"].copy_(blocks * BLOCK + pos % BLOCK)
    for name in ("q", "k", "v"):
        static[name].copy_(torch.randn(static[name].shape, generator=gen).to(torch.bfloat16))


@pytest.mark.gpu
def test_gpu_cache_write_and_decode_kernel_replay_in_a_cuda_graph() -> None:
    gen = torch.Generator().manual_seed(0)
    layer = Attention(HQ, HK, D, scale=D**-0.5)
    init = torch.randn(2, NUM_BLOCKS, BLOCK, HK, D, generator=gen).to("cuda", torch.bfloat16)
    layer.kv_cache = init.clone()
    cols = MAX_LEN // BLOCK
    static = {
        "q": torch.zeros(B, HQ, D, dtype=torch.bfloat16, device="cuda"),
        "k": torch.zeros(B, HK, D, dtype=torch.bfloat16, device="cuda"),
        "v": torch.zeros(B, HK, D, dtype=torch.bfloat16, device="cuda"),
        "slots": torch.zeros(B, dtype=torch.int64, device="cuda"),
        "lens": torch.ones(B, dtype=torch.int32, device="cuda"),
        "tables": torch.zeros(B, cols, dtype=torch.int32, device="cuda"),
    }
    meta = AttentionMetadata(
        cu_seqlens_q=torch.arange(B + 1, dtype=torch.int32, device="cuda"),
        seq_lens_k=static["lens"],
        max_seqlen_q=1,
        max_seqlen_k=MAX_LEN,
        slot_mapping=static["slots"],
        block_tables=static["tables"],
        decode_splits=kernel.splits_for_context(MAX_LEN),
    )

    def step() -> torch.Tensor:
        return layer(static["q"], static["k"], static["v"], meta)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(3):
        _fill(gen, static, NUM_BLOCKS)
        layer.kv_cache.copy_(init)
        graph.replay()
        torch.cuda.synchronize()
        # the reference: the same writes by plain indexing, then the torch decode reference
        ref_cache = init.clone().view(2, -1, HK, D)
        ref_cache[0, static["slots"]] = static["k"]
        ref_cache[1, static["slots"]] = static["v"]
        ref_cache = ref_cache.view_as(init)
        torch.testing.assert_close(layer.kv_cache, ref_cache, rtol=0, atol=0)
        want = kernel.paged_decode_reference(
            static["q"], ref_cache[0], ref_cache[1], static["tables"], static["lens"], D**-0.5
        )
        torch.testing.assert_close(out.view(B, HQ, D).float(), want.float(), rtol=0, atol=2e-2)


@pytest.mark.gpu
def test_gpu_layer_triton_decode_equals_its_sdpa_decode() -> None:
    lens = [1, 900, 37, 2048, 513]
    q, cache, tables, seq_lens = _case(lens, HQ, HK, D, BLOCK, torch.bfloat16, seed=11)
    layer = Attention(HQ, HK, D, scale=D**-0.5)
    layer.kv_cache = cache
    outs = []
    for use_kernel in (True, False):
        meta = AttentionMetadata(
            cu_seqlens_q=torch.arange(len(lens) + 1, dtype=torch.int32, device="cuda"),
            seq_lens_k=seq_lens,
            max_seqlen_q=1,
            max_seqlen_k=max(lens),
            block_tables=tables.clamp(max=cache.shape[1] - 1),
            decode_kernel=use_kernel,
            decode_splits=kernel.splits_for_context(4096),
        )
        outs.append(layer._paged_decode(q, meta) if use_kernel else layer._sdpa_decode(q, meta))
        assert layer.kernel_fits(q)
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=0, atol=2e-2)
