"""What callers of a dead engine loop see: nothing waits forever."""

from __future__ import annotations

import asyncio
import threading

import pytest
from engine_cases import greedy, make_engine

from decoder_service.engine_loop import EngineLoop, EngineRequest
from decoder_service.errors import ServiceError, Status


def test_a_submit_queued_behind_the_failing_step_is_refused(ours):
    engine = make_engine(ours)
    launch = engine.executor.launch
    in_step, release = threading.Event(), threading.Event()

    def launch_blocked_then_fail(scheduled):
        if any(len(s.token_ids) == 1 for s in scheduled.sequences):  # the first decode step
            in_step.set()
            release.wait(10)
            raise torch_oom()
        return launch(scheduled)

    engine.executor.launch = launch_blocked_then_fail

    async def scenario():
        loop = EngineLoop(engine, lambda tid, skip: "")
        loop.start()
        first = await loop.submit(EngineRequest("r0", list(range(10, 30)), greedy(50)))
        assert await asyncio.to_thread(in_step.wait, 10)
        # the engine thread is inside the step: this request's admission waits in the queue
        late = asyncio.create_task(loop.submit(EngineRequest("r1", [5, 6, 7], greedy(5))))
        await asyncio.sleep(0)
        assert not late.done()
        release.set()
        with pytest.raises(ServiceError) as failed:
            while (await asyncio.wait_for(first.next(), 10)).finish_reason is None:
                pass
        with pytest.raises(ServiceError) as refused:
            await asyncio.wait_for(late, 10)
        after = None
        try:
            await loop.submit(EngineRequest("r2", [5, 6, 7], greedy(5)))
        except ServiceError as exc:
            after = exc
        await loop.stop()
        return failed.value, refused.value, after

    failed, refused, after = asyncio.run(scenario())
    assert "engine failed" in str(failed)
    assert refused.status is Status.UNAVAILABLE and "internal error" in str(refused)
    assert after is not None and "internal error" in str(after)


def test_a_submit_after_stop_is_refused(ours):
    async def scenario():
        loop = EngineLoop(make_engine(ours), lambda tid, skip: "")
        loop.start()
        await loop.stop()
        with pytest.raises(ServiceError) as refused:
            await asyncio.wait_for(loop.submit(EngineRequest("r0", [5, 6, 7], greedy(5))), 5)
        return refused.value

    refused = asyncio.run(scenario())
    assert refused.status is Status.UNAVAILABLE and "shutting down" in str(refused)


def torch_oom():
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.12 GiB.")
