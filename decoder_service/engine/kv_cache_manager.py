"""Per-request block tables over the block pool, and the prefix cache keyed by chained hashes.

Contract: the hash of block i of a request covers its tokens, the hash of block i-1 and the
content hash of every media item overlapping the block (with the block's offset inside the
item), so a block is shared only when everything before it and in it is identical: the same
image twice shares KV, two different images behind identical placeholder tokens never do.
``find_cached_prefix`` returns the longest run of cached blocks, always leaving at least one
token to compute (its logits are needed). ``allocate`` grows a request's table for the tokens
it will compute this step and registers the blocks that become full; it returns False, changing
nothing, when the pool is short. Which request gets blocks is the scheduler's business.
"""

from __future__ import annotations

import hashlib
import struct
from typing import NamedTuple

from decoder_service.engine.block_pool import BlockPool, KVBlock
from decoder_service.engine.request import Request


class CachedPrefix(NamedTuple):
    blocks: list[KVBlock]  # cached blocks to reuse, in order
    num_tokens: int  # tokens they hold (len(blocks) * block_size)


def hash_block(parent: bytes | None, token_ids: list[int], media: list[tuple[str, int]]) -> bytes:
    """Chained block hash; ``media`` = (content hash, block start - item offset) per item."""
    h = hashlib.sha256(parent or b"\0")
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    for content_hash, rel in media:
        h.update(b"\x01" + content_hash.encode() + struct.pack("<q", rel))
    return h.digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self._tables: dict[str, list[KVBlock]] = {}
        # the same tables as block ids; a list is replaced, never mutated, when its table grows
        self._ids: dict[str, list[int]] = {}
        self._num_registered: dict[str, int] = {}  # leading blocks already in the prefix cache
        self.prefix_queries = 0  # prompt tokens looked up in the cache
        self.prefix_hits = 0  # of which found

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table, as a snapshot that later allocations leave as it is (the
        step that gets it may be sent to other ranks while the table grows). Do not mutate it:
        it is shared, not copied, until the table grows, so a decode step costs no copy."""
        return self._ids.get(request_id) or []

    def update_block_hashes(self, request: Request) -> None:
        """Extend ``request.block_hashes`` to every full block of its known tokens."""
        bs = self.block_size
        tokens = request.all_token_ids
        hashes = request.block_hashes
        for i in range(len(hashes), len(tokens) // bs):
            start, end = i * bs, (i + 1) * bs
            media = [
                (item.content_hash, start - item.offset)
                for item in request.mm_items
                if item.offset < end and item.end > start
            ]
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, tokens[start:end], media))

    def find_cached_prefix(self, request: Request) -> CachedPrefix:
        if not self.enable_prefix_caching:
            return CachedPrefix([], 0)
        self.update_block_hashes(request)
        # At least the last token must run through the model to produce logits.
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            blocks.append(block)
        return CachedPrefix(blocks, len(blocks) * self.block_size)

    def record_lookup(self, request: Request, cached: CachedPrefix) -> None:
        """Count a first admission's prompt lookup for the hit-rate metrics."""
        self.prefix_queries += request.num_prompt_tokens
        self.prefix_hits += min(cached.num_tokens, request.num_prompt_tokens)

    def allocate(
        self, request: Request, num_new_tokens: int, cached: CachedPrefix | None = None
    ) -> bool:
        """Make room for ``num_new_tokens`` after the computed (and newly cached) tokens."""
        table = self._tables.get(request.request_id)
        if cached is None and table:
            # the common decode step: the tokens still fit in the blocks the request holds
            total = request.num_computed_tokens + num_new_tokens
            if total <= len(table) * self.block_size:
                if total // self.block_size > self._num_registered.get(request.request_id, 0):
                    self._register_full_blocks(request, table, total)
                return True
        hit = cached.blocks if cached else []
        total = request.num_computed_tokens + (cached.num_tokens if cached else 0) + num_new_tokens
        table = table or []
        need = max(self.blocks_for(total) - len(table) - len(hit), 0)
        revive = sum(1 for b in hit if b.ref_cnt == 0)  # cached blocks sitting in the free queue
        if need + revive > self.pool.num_free_blocks:
            return False
        self.pool.touch(hit)
        table = self._tables.setdefault(request.request_id, table)
        new = hit + self.pool.allocate(need) if need else hit
        table.extend(new)
        if new:
            ids = self._ids.get(request.request_id, [])
            self._ids[request.request_id] = [*ids, *(b.block_id for b in new)]
        self._register_full_blocks(request, table, total)
        return True

    def _register_full_blocks(self, request: Request, table: list[KVBlock], total: int) -> None:
        if not self.enable_prefix_caching:
            return
        # NOTE: blocks are registered when scheduled, before their KV is written. That is safe
        # because a later request in the same step that reuses them is executed in the same
        # forward pass, where each layer writes all new KV before any sequence attends.
        self.update_block_hashes(request)
        n_full = min(total // self.block_size, len(request.block_hashes))
        start = self._num_registered.get(request.request_id, 0)
        for i in range(start, n_full):
            self.pool.cache(table[i], request.block_hashes[i])
        self._num_registered[request.request_id] = max(start, n_full)

    def free(self, request: Request) -> None:
        """Release a request's blocks; cached ones stay findable until evicted."""
        table = self._tables.pop(request.request_id, [])
        self._ids.pop(request.request_id, None)
        self._num_registered.pop(request.request_id, None)
        self.pool.free(table[::-1])
