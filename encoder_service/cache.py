"""Embedding cache: a repeated image or video skips decoding and the vision tower.

Contract: ``EmbeddingCache`` maps a content hash (salted hash of the decoded media and its
processing parameters) to the finished ``EncodedItem``, evicting least recently used entries to
stay under ``capacity_bytes`` of embedding data. A second, small map from a *source key* (hash of
the raw bytes + options) to the content hash lets a byte-identical item skip decoding as well.
Capacity 0 disables both. Single-threaded by design: only the event loop calls it.
Computing hashes does not belong here (see ``media/decode.py``).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from encoder_service.items import EncodedItem

_MAX_ALIASES = 65536  # source keys are tiny; this bounds the map, not memory pressure


class EmbeddingCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[str, EncodedItem] = OrderedDict()
        self._aliases: OrderedDict[str, str] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, content_hash: str) -> EncodedItem | None:
        """The cached item marked as a hit, or None; a hit becomes most recently used."""
        item = self._entries.get(content_hash)
        if item is None:
            return None
        self._entries.move_to_end(content_hash)
        return dataclasses.replace(item, cache_hit=True)

    def lookup_source(self, source_key: str) -> EncodedItem | None:
        """The cached item for byte-identical input with the same options, or None."""
        content_hash = self._aliases.get(source_key)
        if content_hash is None:
            return None
        item = self.get(content_hash)
        if item is None:
            del self._aliases[source_key]  # the embedding was evicted; the alias is stale
        else:
            self._aliases.move_to_end(source_key)
        return item

    def put(self, item: EncodedItem, source_key: str | None = None) -> None:
        nbytes = item.embedding.numel() * item.embedding.element_size()
        if not self.enabled or nbytes > self.capacity_bytes:
            return
        if source_key is not None:
            self._aliases[source_key] = item.content_hash
            self._aliases.move_to_end(source_key)
            while len(self._aliases) > _MAX_ALIASES:
                self._aliases.popitem(last=False)
        if item.content_hash in self._entries:
            self._entries.move_to_end(item.content_hash)
            return
        self._entries[item.content_hash] = dataclasses.replace(item, cache_hit=False)
        self.used_bytes += nbytes
        while self.used_bytes > self.capacity_bytes:
            _, old = self._entries.popitem(last=False)
            self.used_bytes -= old.embedding.numel() * old.embedding.element_size()
