"""Scheduler policy, checked with a fake executor that really reads and writes paged slots.

The fake model's next token is a hash of the context it reads back through the block table
(token, position and, for placeholder tokens, the media content), so a wrong block table, a
wrong slot or a prefix-cache block shared between different images changes the output.
"""

from __future__ import annotations

import hashlib
import pickle

import pytest

from decoder_service.engine.config import SchedulerConfig
from decoder_service.engine.kv_cache_manager import KVCacheManager
from decoder_service.engine.request import MediaItem, Request
from decoder_service.engine.sampling_params import SamplingParams
from decoder_service.engine.scheduler import Scheduler, SchedulerOutput

BS = 4
VOCAB = 1000


class FakeExecutor:
    """Writes (token, position, media) per slot and samples hash(context read back)."""

    def __init__(self, requests: dict[str, Request]) -> None:
        self.requests = requests
        self.slots: dict[int, tuple] = {}
        self.known: set[str] = set()

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        for rid in out.dropped_request_ids:
            self.known.discard(rid)
        for new in out.new_requests:
            self.known.add(new.request_id)
        sampled = {}
        for seq in out.sequences:
            assert seq.request_id in self.known, "runner asked to run a request it never got"
            req = self.requests[seq.request_id]
            for j, tok in enumerate(seq.token_ids):
                idx = seq.start + j
                media = next(
                    (
                        it.content_hash
                        for it in req.mm_items
                        if any(a <= idx < b for a, b in it.spans)
                    ),
                    None,
                )
                if media is not None:
                    assert it_has_embeds(req, idx), "a placeholder ran before its embeddings"
                self.slots[self._slot(seq.block_ids, idx)] = (tok, idx, media)
            if seq.sample:
                end = seq.start + len(seq.token_ids)
                ctx = [self.slots[self._slot(seq.block_ids, i)] for i in range(end)]
                assert [c[1] for c in ctx] == list(range(end))
                digest = hashlib.sha256(repr(ctx).encode()).digest()
                sampled[seq.request_id] = int.from_bytes(digest[:4], "little") % VOCAB
        return sampled

    @staticmethod
    def _slot(block_ids: list[int], idx: int) -> int:
        return block_ids[idx // BS] * BS + idx % BS


def it_has_embeds(req: Request, idx: int) -> bool:
    return all(it.embeds is not None for it in req.mm_items if it.offset <= idx < it.end)


def make_requests(n: int, max_tokens: int = 6) -> list[Request]:
    reqs = []
    for i in range(n):
        prompt = [(7 * i + j) % 50 + 1 for j in range(5 + 3 * i)]
        reqs.append(Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens)))
    return reqs


def run(
    reqs: list[Request], num_blocks: int = 256, check=None, **cfg
) -> tuple[dict[str, list[int]], Scheduler]:
    config = SchedulerConfig(**{"max_num_batched_tokens": 64, "max_model_len": 512, **cfg})
    sched = Scheduler(config, KVCacheManager(num_blocks, BS), config.max_model_len)
    execu = FakeExecutor({r.request_id: r for r in reqs})
    for r in reqs:
        sched.add_request(r)
    for _ in range(1000):
        if not sched.has_unfinished:
            break
        out = sched.schedule()
        if check:
            check(out, sched)
        # a worker rank gets the step as bytes: it must carry everything needed to execute it
        sched.update_from_output(out, execu.execute(pickle.loads(pickle.dumps(out))))
    assert not sched.has_unfinished
    assert sched.kv.pool.num_free_blocks == num_blocks  # everything released
    return {r.request_id: r.output_token_ids for r in reqs}, sched


def test_every_request_gets_max_tokens():
    outs, _ = run(make_requests(5))
    assert all(len(toks) == 6 for toks in outs.values())


def test_token_budget_and_running_limit_respected_decodes_first():
    def check(out: SchedulerOutput, sched: Scheduler) -> None:
        assert out.num_batched_tokens == sum(len(s.token_ids) for s in out.sequences) <= 10
        assert len(sched.running) <= 3
        kinds = [len(s.token_ids) == 1 and s.start >= 5 for s in out.sequences]
        assert kinds == sorted(kinds, reverse=True), "a prefill was scheduled before a decode"

    reference, _ = run(make_requests(6))
    outs, _ = run(make_requests(6), check=check, max_num_batched_tokens=10, max_running_requests=3)
    assert outs == reference


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_prefill_gives_identical_outputs(chunk: int):
    seen = []

    def check(out: SchedulerOutput, sched: Scheduler) -> None:
        seen.extend(len(s.token_ids) for s in out.sequences)

    reference, _ = run(make_requests(6))
    outs, _ = run(make_requests(6), check=check, chunked_prefill_size=chunk)
    assert outs == reference
    assert max(seen) <= chunk


def test_preemption_with_a_small_pool_gives_identical_outputs():
    reference, _ = run(make_requests(8, max_tokens=10))
    outs, sched = run(make_requests(8, max_tokens=10), num_blocks=12)
    assert sched.num_preemptions > 0
    assert outs == reference


def test_repeated_prompt_reports_cached_tokens():
    prompt = list(range(1, 12))
    config = SchedulerConfig(max_model_len=512)
    kv = KVCacheManager(64, BS)
    sched = Scheduler(config, kv, 512)
    execu = FakeExecutor({})
    out_a = out_b = None
    for rid in ("a", "b"):
        req = Request(rid, list(prompt), SamplingParams(max_tokens=3))
        execu.requests[rid] = req
        sched.add_request(req)
        while sched.has_unfinished:
            out = sched.schedule()
            sched.update_from_output(out, execu.execute(out))
        out_a, out_b = (req, out_b) if rid == "a" else (out_a, req)
    assert out_a.num_cached_tokens == 0
    assert out_b.num_cached_tokens == 8
    assert out_b.output_token_ids == out_a.output_token_ids
    assert kv.prefix_hits == 8 and kv.prefix_queries == 22


def test_request_waiting_for_media_does_not_block_others():
    prompt = [1, 2, 3, 4, 5] + [9] * 6 + [6, 7]
    item = MediaItem.contiguous("img", 5, 6)  # embeddings not there yet
    slow = Request("slow", prompt, SamplingParams(max_tokens=2), mm_items=[item])
    fast = Request("fast", [1, 2, 3], SamplingParams(max_tokens=2))
    config = SchedulerConfig(max_model_len=512)
    sched = Scheduler(config, KVCacheManager(64, BS), 512)
    execu = FakeExecutor({"slow": slow, "fast": fast})
    sched.add_request(slow)
    sched.add_request(fast)
    for _ in range(4):
        out = sched.schedule()
        sched.update_from_output(out, execu.execute(out))
    assert fast.finished
    assert slow.num_computed_tokens == 5 and not slow.output_token_ids  # stopped at the image
    item.embeds = object()  # arrives (the fake executor only checks presence)
    while sched.has_unfinished:
        out = sched.schedule()
        sched.update_from_output(out, execu.execute(out))
    assert len(slow.output_token_ids) == 2


def test_a_prompt_ending_in_missing_media_waits_with_one_token_left():
    # the image is the prompt's last token: once the text before it is computed the request
    # has one token left, like a decode, and must still wait for the embeddings
    item = MediaItem.contiguous("img", 4, 1)
    late = Request("late", [1, 2, 3, 4, 9], SamplingParams(max_tokens=2), mm_items=[item])
    other = Request("other", [5, 6, 7], SamplingParams(max_tokens=4))
    sched = Scheduler(SchedulerConfig(max_model_len=512), KVCacheManager(64, BS), 512)
    execu = FakeExecutor({"late": late, "other": other})
    sched.add_request(late)
    sched.add_request(other)
    for _ in range(3):
        out = sched.schedule()
        assert all(s.request_id != "late" or s.start < 4 for s in out.sequences)
        sched.update_from_output(out, execu.execute(out))
    assert late.num_computed_tokens == 4 and not late.output_token_ids
    item.embeds = object()
    while sched.has_unfinished:
        out = sched.schedule()
        sched.update_from_output(out, execu.execute(out))
    assert len(late.output_token_ids) == 2 and len(other.output_token_ids) == 4


def test_stop_token_and_eos_end_requests():
    req = Request("a", [1, 2, 3], SamplingParams(max_tokens=50), eos_token_ids=())
    outs, _ = run([req])
    first = outs["a"][0]
    eos = Request("b", [1, 2, 3], SamplingParams(max_tokens=50), eos_token_ids=(first,))
    run([eos])
    assert eos.output_token_ids == [first] and eos.finish_reason == "stop"
    ignored = Request(
        "c", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True), eos_token_ids=(first,)
    )
    run([ignored])
    assert len(ignored.output_token_ids) == 4 and ignored.finish_reason == "length"
    stop_id = Request("d", [1, 2, 3], SamplingParams(max_tokens=50, stop_token_ids=(first,)))
    run([stop_id])
    assert stop_id.stop_reason == first and stop_id.finish_reason == "stop"


def test_max_model_len_ends_generation():
    req = Request("a", list(range(1, 9)), SamplingParams(max_tokens=100))
    run([req], max_model_len=12)
    assert req.num_tokens == 12 and req.finish_reason == "length"
