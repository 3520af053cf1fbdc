"""Replica choice: healthy and idle first, round robin among equals, unhealthy only as a last try."""

from __future__ import annotations

import pytest

from decoder_service.config import EncoderPoolConfig
from decoder_service.encoder_pool import EncoderPool


class FakeReplica:
    def __init__(self, target: str, healthy: bool | None, in_flight: int = 0) -> None:
        self.target, self.healthy, self.in_flight = target, healthy, in_flight


def pool_of(*replicas: FakeReplica) -> EncoderPool:
    pool = EncoderPool(EncoderPoolConfig(encoder_urls=tuple(r.target for r in replicas)))
    pool.replicas = list(replicas)
    return pool


def test_healthy_idle_replicas_are_chosen_in_turn():
    pool = pool_of(FakeReplica("a", True), FakeReplica("b", True), FakeReplica("c", True, 2))
    picked = [pool.pick().target for _ in range(4)]
    assert picked == ["a", "b", "a", "b"]  # c is busier


def test_an_unhealthy_replica_is_tried_only_after_every_healthy_one():
    pool = pool_of(FakeReplica("sick", False), FakeReplica("ok", True, in_flight=5))
    assert pool.pick().target == "ok"
    assert pool.pick(exclude={"ok"}).target == "sick"
    assert pool.pick(exclude={"ok", "sick"}) is None


@pytest.mark.parametrize("state", [None, False])
def test_a_request_is_not_refused_while_probes_say_nothing_or_time_out(state):
    # a slow probe on a busy host must not turn into "no encoder is available"
    pool = pool_of(FakeReplica("only", state))
    assert pool.pick().target == "only"
