"""Slot allocator over one preallocated pool, with consumer acks, TTLs and generations.

The pool's data region is cut into ``num_blocks`` blocks of ``block_bytes`` (the alignment). A slot
is a run of contiguous blocks found first-fit; its id is its first block. Each slot holds a
``Lease``: how many consumers must ack it, who already did, and when it expires. A slot is freed
when every consumer acked, when its TTL runs out (``sweep_expired``; ``allocate`` also sweeps before
giving up, so a consumer that never acks cannot exhaust the pool), or on ``release``.

Staleness: the allocator writes into two shared tables that readers in other processes check
(``generations[slot_id]`` and ``lengths[slot_id]``). Allocation writes the length, then the slot's
unique generation; freeing writes generation 0 first. A reader that sees the descriptor's
generation before and after its copy knows the bytes it read were that item's.

NOTE: the tables live in shared memory; writes are single aligned 8-byte stores, so a reader sees
either the old or the new value, never a torn one.

Not here: memory (pools), generation numbering (the exporter owns one counter for pool and
spilled items), thread safety (the exporter holds a lock around every call).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, MutableSequence
from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass
class Lease:
    """Who must still ack an item, and until when it is kept regardless."""

    generation: int
    consumers: int  # acks needed before the item is freed
    expires_at: float  # clock time after which the item is freed without acks
    acked: set[str] = field(default_factory=set)  # named consumers (idempotent acks)
    anonymous_acks: int = 0  # acks without a consumer name, each counts once

    def ack(self, consumer: str | None) -> bool:
        """Record one ack; True when every consumer has acked."""
        if consumer is None:
            self.anonymous_acks += 1
        else:
            self.acked.add(consumer)
        return len(self.acked) + self.anonymous_acks >= self.consumers


@dataclass
class Slot:
    slot_id: int  # first block
    num_blocks: int
    nbytes: int
    lease: Lease


class AckOutcome(NamedTuple):
    known: bool  # the key named a live item
    released: bool  # this ack freed it


class SlotAllocator:
    def __init__(
        self,
        num_blocks: int,
        block_bytes: int,
        generations: MutableSequence[int],  # [num_blocks] int64, shared with readers
        lengths: MutableSequence[int],  # [num_blocks] int64, shared with readers
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if num_blocks <= 0 or block_bytes <= 0:
            raise ValueError("a pool needs at least one block of at least one byte")
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self._generations = generations
        self._lengths = lengths
        self._clock = clock
        # Free runs as parallel sorted lists of (start, length), coalesced on free.
        self._free_starts: list[int] = [0]
        self._free_lengths: list[int] = [num_blocks]
        self._slots: dict[int, Slot] = {}
        self.expired_total = 0

    # -- queries -------------------------------------------------------------------------

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - sum(self._free_lengths)

    @property
    def live_slots(self) -> int:
        return len(self._slots)

    def lookup(self, slot_id: int, generation: int) -> Slot | None:
        slot = self._slots.get(slot_id)
        if slot is None or slot.lease.generation != generation:
            return None
        return slot

    # -- lifecycle -----------------------------------------------------------------------

    def allocate(self, nbytes: int, consumers: int, ttl_s: float, generation: int) -> Slot | None:
        """A slot for ``nbytes``, or None when no run of free blocks is long enough."""
        need = max(1, -(-nbytes // self.block_bytes))
        if need > self.num_blocks:
            return None
        index = self._first_fit(need)
        if index is None and self.sweep_expired():
            index = self._first_fit(need)
        if index is None:
            return None
        start = self._free_starts[index]
        if self._free_lengths[index] == need:
            del self._free_starts[index], self._free_lengths[index]
        else:
            self._free_starts[index] += need
            self._free_lengths[index] -= need
        lease = Lease(generation, max(1, consumers), self._clock() + ttl_s)
        slot = Slot(slot_id=start, num_blocks=need, nbytes=nbytes, lease=lease)
        self._slots[start] = slot
        self._lengths[start] = nbytes
        self._generations[start] = generation  # published last: readers trust the length now
        return slot

    def ack(self, slot_id: int, generation: int, consumer: str | None) -> AckOutcome:
        slot = self.lookup(slot_id, generation)
        if slot is None:
            return AckOutcome(known=False, released=False)
        if slot.lease.ack(consumer):
            self._free(slot)
            return AckOutcome(known=True, released=True)
        return AckOutcome(known=True, released=False)

    def release(self, slot_id: int, generation: int) -> bool:
        slot = self.lookup(slot_id, generation)
        if slot is None:
            return False
        self._free(slot)
        return True

    def sweep_expired(self, now: float | None = None) -> int:
        """Free every slot whose TTL ran out; returns how many were freed."""
        now = self._clock() if now is None else now
        expired = [s for s in self._slots.values() if s.lease.expires_at <= now]
        for slot in expired:
            self._free(slot)
        self.expired_total += len(expired)
        return len(expired)

    def release_all(self) -> None:
        for slot in list(self._slots.values()):
            self._free(slot)

    # -- internals -----------------------------------------------------------------------

    def _first_fit(self, need: int) -> int | None:
        for i, length in enumerate(self._free_lengths):
            if length >= need:
                return i
        return None

    def _free(self, slot: Slot) -> None:
        # NOTE: invalidate before the blocks can be handed out again, so a reader mid-copy sees
        # the generation change before any new bytes land.
        self._generations[slot.slot_id] = 0
        self._lengths[slot.slot_id] = 0
        del self._slots[slot.slot_id]
        start, length = slot.slot_id, slot.num_blocks
        i = bisect.bisect_left(self._free_starts, start)
        self._free_starts.insert(i, start)
        self._free_lengths.insert(i, length)
        # Coalesce with the next run, then with the previous one.
        if i + 1 < len(self._free_starts) and start + length == self._free_starts[i + 1]:
            self._free_lengths[i] += self._free_lengths[i + 1]
            del self._free_starts[i + 1], self._free_lengths[i + 1]
        if i > 0 and self._free_starts[i - 1] + self._free_lengths[i - 1] == start:
            self._free_lengths[i - 1] += self._free_lengths[i]
            del self._free_starts[i], self._free_lengths[i]
