"""What the engine reports about each step (kind, sizes, wall time) and the decoder's periodic
throughput line built from it."""

from __future__ import annotations

import logging

import pytest
from engine_cases import greedy, make_engine

from decoder_service.engine.engine import EngineStats, RequestOutput, StepRecord
from decoder_service.metrics import DecoderMetrics, StepLog


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_steps_are_recorded_as_mixed_then_decode(ours, overlap: bool):
    engine = make_engine(ours, overlap=overlap)
    assert engine.stats().last_step is None
    prompts = [list(range(10, 40)), list(range(50, 67))]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(4), [], None, 0)
    prompt_tokens = sum(map(len, prompts))
    records = []
    while engine.has_unfinished_requests:
        engine.step()
        records.append(engine.stats().last_step)
    first = records[0]
    assert first.kind == "mixed" and first.num_seqs == 2 and first.num_tokens == prompt_tokens
    later = [r for r in records[1:] if r is not None]
    assert later and all(r.kind == "decode" and r.num_tokens == r.num_seqs for r in later)
    assert all(r.seconds > 0 for r in [first, *later])


def _stats(step: StepRecord | None, running=3, waiting=1) -> EngineStats:
    return EngineStats(running, waiting, 0.25, 100, 0, 0, 0, last_step=step)


def _out(n: int) -> RequestOutput:
    return RequestOutput("r", list(range(n)), "", False, None, None, 0, 0)


def test_step_log_summarises_each_interval_once(caplog):
    now = [0.0]
    steps = StepLog(10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="decoder_service.metrics")
    for seconds, kind, tokens in ((0.02, "decode", 4), (0.04, "decode", 4), (0.5, "mixed", 900)):
        now[0] += 2.0
        steps.observe_step(_stats(StepRecord(kind, 4, tokens, seconds)), [_out(4)])
    assert not caplog.records  # 6 s: the interval is not over
    now[0] = 10.0
    steps.observe_step(_stats(None, running=5, waiting=2), [])  # an idle step closes it
    (record,) = caplog.records
    line = record.getMessage()
    assert "decode 2 steps (30.0 ms mean, 40.0 max, 4 tokens)" in line
    assert "mixed 1 steps (500.0 ms mean, 500.0 max, 900 tokens)" in line
    assert "busy 6%" in line and "generation 1.2 tok/s" in line  # 12 tokens in 10 s
    assert "running 5, waiting 2, KV 25.0%" in line
    now[0] = 25.0
    steps.observe_step(_stats(None), [])
    assert len(caplog.records) == 1  # an interval with no steps logs nothing


def test_step_histograms_are_exported():
    metrics = DecoderMetrics("m")
    metrics.observe_step(_stats(StepRecord("decode", 8, 8, 0.03)), [_out(8)])
    metrics.observe_step(_stats(StepRecord("mixed", 2, 700, 0.2)), [])
    reg = metrics.registry
    labels = {"model_name": "m", "kind": "decode"}
    assert reg.get_sample_value("vlm:engine_step_seconds_count", labels) == 1
    assert reg.get_sample_value("vlm:engine_step_seconds_sum", {**labels, "kind": "mixed"}) == 0.2
    assert reg.get_sample_value("vlm:iteration_tokens_total_sum", {"model_name": "m"}) == 708


def test_a_failing_step_fails_every_stream_and_names_the_step(ours, caplog):
    import asyncio

    from decoder_service.engine_loop import EngineLoop, EngineRequest
    from decoder_service.errors import ServiceError

    engine = make_engine(ours)
    launch = engine.executor.launch
    calls = []

    def launch_then_fail(scheduled):
        calls.append(scheduled)
        seqs = scheduled.sequences
        if len(seqs) == 2 and all(len(s.token_ids) == 1 for s in seqs):  # both decoding
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return launch(scheduled)

    engine.executor.launch = launch_then_fail
    caplog.set_level(logging.ERROR, logger="decoder_service.engine_loop")

    async def scenario():
        loop = EngineLoop(engine, lambda tid, skip: "")
        loop.start()
        streams = [
            await loop.submit(EngineRequest(f"r{i}", list(range(10 + i, 30)), greedy(50)))
            for i in range(2)
        ]
        errors = []
        for stream in streams:
            with pytest.raises(ServiceError) as info:
                while (await asyncio.wait_for(stream.next(), 10)).finish_reason is None:
                    pass
            errors.append(info.value)
        await loop.stop()
        return loop, errors

    loop, errors = asyncio.run(scenario())
    assert loop.dead and all("engine failed" in str(e) for e in errors)
    (record,) = [r for r in caplog.records if "engine step failed" in r.getMessage()]
    # the step that broke: two decodes, nothing new
    assert "2 sequences, 2 tokens: 2 one-token, 0 continuing a cached prefix, 0 new" in (
        record.getMessage()
    )
