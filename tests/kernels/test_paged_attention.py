"""Triton paged decode attention against its torch reference and the attention layer's path.

On a GPU the kernels run compiled. On CPU they run under Triton's interpreter, which must be
switched on (``TRITON_INTERPRET=1``) before Triton is first imported, so
``test_cases_pass_under_the_interpreter`` re-runs this file in a fresh pytest process with the
variable set rather than changing this process. The interpreter's ``tl.dot`` gives wrong results
for bfloat16 here, so CPU covers float32 and float16; bfloat16 at the model's real head layout
runs in the GPU test.
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


def _case(lens: list[int], hq: int, hk: int, d: int, block: int, dtype, device, seed: int):
    gen = torch.Generator().manual_seed(seed)
    need = [(n + block - 1) // block for n in lens]
    num_blocks = sum(need) + 3
    cache = torch.randn(2, num_blocks, block, hk, d, generator=gen).to(device, dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    # entries past each sequence's last block point far outside the cache: never read
    tables = torch.full((len(lens), max(need) + 1), 10**7, dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[used : used + n].int()
        used += n
    q = torch.randn(len(lens), hq, d, generator=gen).to(device, dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return q, cache, tables.to(device), seq_lens.to(device)


@kernel_case
@pytest.mark.parametrize(
    ("lens", "partition"),
    [
        ([1], 16),
        ([16, 17, 5], 32),
        ([100, 3, 64, 33], 32),
        ([130, 1], 128),
        ([65, 127, 1, 200, 64], None),  # the default: splits of 64 tokens, tails of a tile
    ],
)
def test_kernel_matches_reference_float32(lens: list[int], partition: int | None) -> None:
    q, cache, tables, seq_lens = _case(lens, 8, 2, 32, 16, torch.float32, DEVICE, seed=len(lens))
    args = (q, cache[0], cache[1], tables, seq_lens)
    got = kernel.paged_decode_attention(*args, max(lens), 0.17, partition=partition)
    want = kernel.paged_decode_reference(*args, 0.17)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@kernel_case
def test_kernel_groups_of_12_and_a_long_context_match_reference_float32() -> None:
    # GLM-4.5V's 12 query heads per KV head (padded to 16 dot rows); 2100 tokens (132 pages)
    # over the 32 default splits give 5 pages a split: a whole tile, then one straddling its end
    lens = [2100, 1, 77]
    q, cache, tables, seq_lens = _case(lens, 24, 2, 16, 16, torch.float32, DEVICE, seed=6)
    args = (q, cache[0], cache[1], tables, seq_lens)
    assert kernel.splits_for_context(max(lens)) == kernel.MAX_SPLITS
    got = kernel.paged_decode_attention(*args, max(lens), 0.25)
    want = kernel.paged_decode_reference(*args, 0.25)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@kernel_case
def test_kernel_float16_and_the_attention_layer_agree() -> None:
    lens = [40, 7, 96]
    q, cache, tables, seq_lens = _case(lens, 12, 1, 64, 16, torch.float16, DEVICE, seed=3)
    got = kernel.paged_decode_attention(
        q, cache[0], cache[1], tables, seq_lens, max(lens), 0.125, partition=32
    )
    # the layer's batched SDPA decode on the same cache, in float32, is an independent path
    layer = Attention(12, 1, 64, scale=0.125)
    layer.kv_cache = cache.float().cpu()
    meta = AttentionMetadata(
        cu_seqlens_q=torch.arange(len(lens) + 1, dtype=torch.int32),
        seq_lens_k=seq_lens.cpu(),
        max_seqlen_q=1,
        max_seqlen_k=max(lens),
        block_tables=tables.cpu().clamp(max=cache.shape[1] - 1),
    )
    want = layer._sdpa_decode(q.float().cpu(), meta)
    torch.testing.assert_close(got.float().cpu(), want, rtol=0, atol=2e-3)


@kernel_case
def test_rejects_mismatched_shapes_and_split_counts() -> None:
    q, cache, tables, seq_lens = _case([5], 8, 2, 32, 16, torch.float32, "cpu", seed=4)
    with pytest.raises(ValueError, match="multiple of block_size"):
        kernel.paged_decode_attention(q, cache[0], cache[1], tables, seq_lens, 5, 1.0, 24)
    with pytest.raises(ValueError, match="does not fit"):
        kernel.paged_decode_attention(q[:, :7], cache[0], cache[1], tables, seq_lens, 5, 1.0)
    for splits in (0, kernel.MAX_SPLITS + 1):
        with pytest.raises(ValueError, match="num_splits"):
            kernel.paged_decode_attention(
                q, cache[0], cache[1], tables, seq_lens, 5, 1.0, num_splits=splits
            )


@pytest.mark.gpu
def test_kernel_bf16_glm45v_heads_long_context() -> None:
    lens = [1, 4096, 777, 2048]
    q, cache, tables, seq_lens = _case(lens, 12, 1, 128, 16, torch.bfloat16, "cuda", seed=5)
    args = (q, cache[0], cache[1], tables, seq_lens)
    got = kernel.paged_decode_attention(*args, max(lens), 128**-0.5)
    want = kernel.paged_decode_reference(*args, 128**-0.5)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2)
