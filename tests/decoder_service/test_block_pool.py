"""Block pool and prefix cache: reference counts, chained hashes with media, LRU eviction."""

from __future__ import annotations

import pytest

from decoder_service.engine.block_pool import BlockPool
from decoder_service.engine.kv_cache_manager import KVCacheManager
from decoder_service.engine.request import MediaItem, Request
from decoder_service.engine.sampling_params import SamplingParams

BS = 4


def make_request(rid: str, tokens: list[int], media: list[MediaItem] = ()) -> Request:
    return Request(rid, list(tokens), SamplingParams(), mm_items=list(media))


def admit(kv: KVCacheManager, req: Request) -> int:
    """Admit like the scheduler does: reuse the cached prefix, allocate the rest."""
    cached = kv.find_cached_prefix(req)
    assert kv.allocate(req, req.num_tokens - cached.num_tokens, cached)
    req.num_computed_tokens = req.num_tokens
    return cached.num_tokens


def test_allocate_and_free_return_blocks_to_the_pool():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert pool.num_free_blocks == 1 and pool.usage == pytest.approx(0.75)
    pool.free(blocks)
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError):
        pool.free(blocks[:1])
    with pytest.raises(RuntimeError):
        pool.allocate(5)


def test_repeated_prompt_hits_full_blocks_but_always_computes_the_last_token():
    kv = KVCacheManager(16, BS)
    tokens = list(range(10))  # 2 full blocks + 2 tokens
    a = make_request("a", tokens)
    assert admit(kv, a) == 0
    kv.free(a)
    assert admit(kv, make_request("b", tokens)) == 8
    # exactly block-aligned prompt: the last block is not taken, its last token needs logits
    c = make_request("c", list(range(100, 108)))
    admit(kv, c)
    kv.free(c)
    assert admit(kv, make_request("d", list(range(100, 108)))) == 4


def test_different_prefix_token_breaks_the_chain_for_all_later_blocks():
    kv = KVCacheManager(16, BS)
    a = make_request("a", list(range(13)))
    admit(kv, a)
    changed = [99] + list(range(1, 13))  # differs in block 0 only
    assert admit(kv, make_request("b", changed)) == 0


def image(content_hash: str, offset: int, length: int) -> MediaItem:
    return MediaItem.contiguous(content_hash, offset, length)


def test_same_image_shares_blocks_different_image_does_not():
    kv = KVCacheManager(32, BS)
    # text 0..5, image placeholders 6..13 (token 7), text after
    tokens = [1, 2, 3, 4, 5, 6] + [7] * 8 + [8, 9, 10, 11, 12]
    a = make_request("a", tokens, [image("img-A", 6, 8)])
    admit(kv, a)
    same = make_request("b", tokens, [image("img-A", 6, 8)])
    assert admit(kv, same) == 16  # 4 full blocks of 19 tokens
    other = make_request("c", tokens, [image("img-B", 6, 8)])
    # block 0 (tokens 0..3) is text before the image: shared; block 1 holds image tokens
    assert admit(kv, other) == 4


def test_image_moved_within_prompt_does_not_share_its_blocks():
    kv = KVCacheManager(32, BS)
    tokens = [1, 2, 3, 4] + [7] * 8 + [5, 6, 7, 8, 9]
    admit(kv, make_request("a", tokens, [image("img", 4, 8)]))
    # same tokens, but the image's embeddings start one token later (media offset matters)
    shifted = make_request("b", tokens, [image("img", 5, 7)])
    assert admit(kv, shifted) == 4


def test_shared_blocks_are_ref_counted():
    kv = KVCacheManager(8, BS)
    tokens = list(range(9))
    a = make_request("a", tokens)
    admit(kv, a)
    b = make_request("b", tokens)
    assert admit(kv, b) == 8
    shared = kv._tables["a"][:2]
    assert [blk.ref_cnt for blk in shared] == [2, 2]
    kv.free(a)
    assert [blk.ref_cnt for blk in shared] == [1, 1]
    assert kv.pool.num_free_blocks == 8 - 3  # a's private tail block came back
    kv.free(b)
    assert kv.pool.num_free_blocks == 8


def test_eviction_is_least_recently_freed_first_and_tail_before_prefix():
    kv = KVCacheManager(4, BS)
    a = make_request("a", list(range(9)))  # 3 blocks, 2 of them full
    admit(kv, a)
    kv.free(a)
    # 3 blocks: the never-used block, then a's tail (unhashed), then a's second full block
    b = make_request("b", list(range(50, 59)))
    admit(kv, b)
    kv.free(b)
    # a's first block (its prefix) survived; its second block was evicted
    assert admit(kv, make_request("a2", list(range(9)))) == 4


def test_allocate_fails_without_side_effects_when_short():
    kv = KVCacheManager(3, BS)
    a = make_request("a", list(range(8)))
    assert kv.allocate(a, 8)
    b = make_request("b", list(range(20, 30)))
    assert not kv.allocate(b, 10)
    assert kv.block_ids("b") == [] and kv.pool.num_free_blocks == 1


def test_revived_cached_blocks_count_against_free_space():
    kv = KVCacheManager(3, BS)
    a = make_request("a", list(range(9)))
    admit(kv, a)
    kv.free(a)  # 3 free blocks, 2 of them hold a's cached prefix
    b = make_request("b", list(range(9)) + [100, 101, 102, 103])
    cached = kv.find_cached_prefix(b)
    assert cached.num_tokens == 8
    # reviving 2 blocks + 2 new ones = 4 > 3: refuse, and leave the cache intact
    assert not kv.allocate(b, b.num_tokens - 8, cached)
    assert kv.pool.num_free_blocks == 3
    assert kv.find_cached_prefix(make_request("c", list(range(9)))).num_tokens == 8
