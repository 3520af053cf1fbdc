"""Slot allocator: no overlaps, space comes back on ack/TTL, generations expose stale slots."""

from __future__ import annotations

import random

from encoder_service.transport.slots import SlotAllocator

BLOCK = 256


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(num_blocks: int = 16, clock: Clock | None = None):
    gens = [0] * num_blocks
    lengths = [0] * num_blocks
    alloc = SlotAllocator(num_blocks, BLOCK, gens, lengths, clock or Clock())
    return alloc, gens, lengths


def test_random_alloc_free_never_overlaps_and_coalesces_back_to_one_run():
    alloc, gens, lengths = make(64)
    rng = random.Random(0)
    live = {}  # generation -> slot
    gen = 0
    for _ in range(2000):
        if live and rng.random() < 0.45:
            g = rng.choice(list(live))
            slot = live.pop(g)
            assert alloc.ack(slot.slot_id, g, None).released
        else:
            gen += 1
            nbytes = rng.randint(1, 9 * BLOCK)
            slot = alloc.allocate(nbytes, consumers=1, ttl_s=100.0, generation=gen)
            if slot is not None:
                assert slot.num_blocks * BLOCK >= nbytes
                live[gen] = slot
        # Independent occupancy check: every live slot's blocks are distinct and in range.
        owned = [b for s in live.values() for b in range(s.slot_id, s.slot_id + s.num_blocks)]
        assert len(owned) == len(set(owned))
        assert all(0 <= b < 64 for b in owned)
        assert alloc.used_blocks == len(owned)
        for g, s in live.items():
            assert gens[s.slot_id] == g and lengths[s.slot_id] == s.nbytes
    for g, s in list(live.items()):
        alloc.release(s.slot_id, g)
    # Fully coalesced: the whole pool fits one allocation again.
    assert alloc.allocate(64 * BLOCK, 1, 1.0, gen + 1) is not None


def test_slot_freed_only_when_every_consumer_acked_and_acks_are_idempotent():
    alloc, gens, _ = make()
    slot = alloc.allocate(BLOCK, consumers=2, ttl_s=10.0, generation=7)
    assert alloc.ack(slot.slot_id, 7, "rank0") == (True, False)
    assert alloc.ack(slot.slot_id, 7, "rank0") == (True, False)  # a retried ack counts once
    assert gens[slot.slot_id] == 7
    assert alloc.ack(slot.slot_id, 7, "rank1") == (True, True)
    assert gens[slot.slot_id] == 0
    assert alloc.ack(slot.slot_id, 7, "rank1") == (False, False)  # late ack: unknown, no harm


def test_stale_generation_is_not_live_after_reuse():
    alloc, gens, _ = make(4)
    a = alloc.allocate(4 * BLOCK, 1, 10.0, generation=1)
    alloc.ack(a.slot_id, 1, None)
    b = alloc.allocate(4 * BLOCK, 1, 10.0, generation=2)
    assert b.slot_id == a.slot_id
    assert alloc.lookup(a.slot_id, 1) is None
    assert gens[a.slot_id] == 2
    assert alloc.ack(a.slot_id, 1, None) == (False, False)  # an old ack cannot free the new item


def test_consumer_that_never_acks_cannot_exhaust_the_pool():
    clock = Clock()
    alloc, _, _ = make(8, clock)
    for g in range(1, 9):
        assert alloc.allocate(BLOCK, 1, ttl_s=5.0, generation=g) is not None
    assert alloc.allocate(BLOCK, 1, 5.0, generation=100) is None  # full, nobody acked
    clock.now = 5.0
    # allocate() sweeps expired slots before giving up.
    assert alloc.allocate(8 * BLOCK, 1, 5.0, generation=101) is not None
    assert alloc.expired_total == 8


def test_sweep_frees_only_expired_slots():
    clock = Clock()
    alloc, _, _ = make(8, clock)
    old = alloc.allocate(BLOCK, 1, ttl_s=1.0, generation=1)
    clock.now = 0.5
    young = alloc.allocate(BLOCK, 1, ttl_s=1.0, generation=2)
    clock.now = 1.2
    assert alloc.sweep_expired() == 1
    assert alloc.lookup(old.slot_id, 1) is None
    assert alloc.lookup(young.slot_id, 2) is not None


def test_oversized_request_is_refused_not_raised():
    alloc, _, _ = make(4)
    assert alloc.allocate(4 * BLOCK + 1, 1, 1.0, generation=1) is None
    assert alloc.used_blocks == 0
