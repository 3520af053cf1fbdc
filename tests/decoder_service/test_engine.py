"""LLMEngine end to end on the tiny checkpoint, against transformers' greedy ``generate``.

Sixteen mixed requests (text, images of different sizes, two images in one prompt, videos,
shared prefixes, an exact repeat) must give the same tokens batched, alone, preempted, with a
7-token step budget, and as transformers generates them. With ``overlap_outputs`` (the next step
launched before this one's outputs are built) every step returns what the synchronous engine
returns, stop strings, log-probabilities, penalties, seeds and forced tokens included; requests
added, given media or aborted between steps end with the same tokens and texts.
"""

from __future__ import annotations

import random

import pytest
import torch
from engine_cases import add, greedy, make_engine, run_batch
from engine_reference import draw_image

from decoder_service.engine.config import MediaLimits
from decoder_service.engine.engine import CompletedRequest, LLMEngine
from decoder_service.engine.errors import (
    DuplicateRequestError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    KVCapacityError,
    MediaSpanError,
    PromptTooLongError,
    TooManyMediaError,
)
from decoder_service.engine.request import MediaItem
from decoder_service.engine.sampling_params import ForcedTokens, SamplingParams


def test_batch_equals_alone_equals_transformers(ours, specs, expected):
    assert any(item.modality == "video" for spec, _ in specs for item in spec.items)
    batched = run_batch(make_engine(ours), specs)
    engine = make_engine(ours)
    alone = [run_batch(engine, [s])[0] for s in specs]
    assert alone == expected
    assert batched == expected


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_preemption_with_a_small_pool_gives_identical_outputs(ours, specs, expected, overlap: bool):
    largest = max(-(-(len(s.prompt_ids) + n) // 4) for s, n in specs)
    engine = make_engine(ours, block_size=4, num_blocks=largest + 4, overlap=overlap)
    assert run_batch(engine, specs) == expected
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.kv_usage == 0.0 and stats.num_running == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_chunked_prefill_with_a_7_token_budget_gives_identical_outputs(
    ours, specs, expected, overlap: bool
):
    # chunks cut through images and video frame groups at arbitrary places
    engine = make_engine(ours, block_size=4, max_num_batched_tokens=7, overlap=overlap)
    assert run_batch(engine, specs) == expected


def test_prefix_cache_shares_the_same_image_not_a_different_one(ours, reference):
    same_a = reference.build([("image", draw_image(90, 60, 0)), ("text", "What is this?")])
    same_b = reference.build([("image", draw_image(90, 60, 0)), ("text", "What is this?")])
    other = reference.build([("image", draw_image(90, 60, 9)), ("text", "What is this?")])
    assert same_a.prompt_ids == other.prompt_ids  # identical tokens, only the pixels differ
    engine = make_engine(ours, block_size=4)
    results = {}
    for rid, spec in (("first", same_a), ("repeat", same_b), ("other", other)):
        add(engine, rid, spec, greedy(4))
        results |= engine.run_to_completion()
    n = len(same_a.prompt_ids)
    assert results["first"].num_cached_tokens == 0
    assert results["repeat"].num_cached_tokens == (n - 1) // 4 * 4
    image_start = other.items[0].offset
    assert results["other"].num_cached_tokens <= image_start // 4 * 4
    assert results["other"].token_ids == reference.generate(other, 4)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_embeddings_arriving_after_admission(ours, specs, expected, overlap: bool):
    engine = make_engine(ours, block_size=4, max_num_batched_tokens=16, overlap=overlap)
    spec, n = specs[8]  # a video
    text_spec, text_n = specs[0]
    add(engine, "late", spec, greedy(n), with_embeds=False)
    add(engine, "text", text_spec, greedy(text_n))
    outputs = {}
    for _ in range(3):
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert outputs.get("text")  # not blocked by the request waiting for media
    assert "late" not in outputs
    engine.attach_media("late", 0, spec.items[0].embeds)
    done = engine.run_to_completion()
    assert outputs["text"] + done.get("text", CompletedRequest("", [])).token_ids == expected[0]
    assert done["late"].token_ids == expected[8]


def test_seeded_sampling_is_reproducible_across_batches(ours, specs):
    def sample(seed: int, batch: list[int]) -> list[int]:
        engine = make_engine(ours, max_num_batched_tokens=32)
        for i in batch:
            add(
                engine,
                str(i),
                specs[i][0],
                SamplingParams(temperature=1.5, max_tokens=12, seed=seed + i, ignore_eos=True),
            )
        return engine.run_to_completion()["3"].token_ids

    first = sample(7, [3])
    assert sample(7, [0, 3, 8, 12]) == first
    assert sample(8, [3]) != first


def test_stop_strings_cut_the_text(ours, specs):
    spec = specs[1][0]
    engine = make_engine(ours)
    add(engine, "full", spec, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    full = engine.run_to_completion()["full"]
    text = full.text
    # a stop string that first appears somewhere after the start of the text
    stop = next(
        text[i : i + 3]
        for i in range(2, len(text) - 3)
        if text.find(text[i : i + 3]) == i and text[i : i + 3].strip()
    )
    add(
        engine,
        "stopped",
        spec,
        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[stop]),
    )
    out = engine.run_to_completion()["stopped"]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == full.token_ids[: len(out.token_ids)]


def test_bad_inputs_rejected_with_typed_errors_while_others_continue(ours, specs, expected):
    engine = make_engine(
        ours, num_blocks=24, max_model_len=512, media=MediaLimits(max_images=1, max_videos=1)
    )
    good = [0, 3, 8]
    for i in good:
        add(engine, str(i), specs[i][0], greedy(specs[i][1]))
    first = engine.step()
    text_spec = specs[0][0]
    ids = text_spec.prompt_ids
    cases = [
        (PromptTooLongError, lambda: engine.add_request("long", ids * 200)),
        (TooManyMediaError, lambda: add(engine, "two", specs[7][0], greedy(4))),
        (KVCapacityError, lambda: engine.add_request("huge", ids, SamplingParams(max_tokens=2000))),
        (
            InvalidSamplingParamsError,
            lambda: engine.add_request("t", ids, SamplingParams(temperature=-1)),
        ),
        (
            InvalidSamplingParamsError,
            lambda: engine.add_request("p", ids, SamplingParams(top_p=0.0)),
        ),
        (
            InvalidSamplingParamsError,
            lambda: engine.add_request("m", ids, SamplingParams(max_tokens=0)),
        ),
        (DuplicateRequestError, lambda: engine.add_request("0", ids)),
        (InvalidRequestError, lambda: engine.add_request("oov", ids + [10**6])),
        (InvalidRequestError, lambda: engine.add_request("empty", [])),
        (
            MediaSpanError,
            lambda: engine.add_request(
                "shape",
                specs[3][0].prompt_ids,
                greedy(2),
                [
                    MediaItem(it.content_hash, it.spans, it.modality, torch.zeros(1, 64))
                    for it in specs[3][0].items
                ],
                specs[3][0].positions,
                specs[3][0].rope_delta,
            ),
        ),
        (
            MediaSpanError,
            lambda: engine.add_request(
                "span", ids, greedy(2), [MediaItem.contiguous("x", len(ids) - 1, 5)]
            ),
        ),
    ]
    for error, call in cases:
        with pytest.raises(error):
            call()
    assert set(engine.scheduler.requests) == {str(i) for i in good}
    done = engine.run_to_completion()
    tokens = {
        i: [t for o in first if o.request_id == str(i) for t in o.new_token_ids] for i in good
    }
    for i in good:
        assert tokens[i] + done[str(i)].token_ids == expected[i]


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_abort_frees_blocks_and_reports_abort(ours, specs, overlap: bool):
    engine = make_engine(ours, overlap=overlap)
    add(engine, "a", specs[5][0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    add(engine, "b", specs[0][0], greedy(3))
    engine.step()
    assert engine.abort_request("a")
    assert not engine.abort_request("a")
    done = engine.run_to_completion()
    assert done["a"].finish_reason == "abort"
    assert len(done["b"].token_ids) > 0
    assert engine.kv.pool.num_free_blocks == engine.kv.num_blocks


def test_logprobs_returned_per_token(ours, specs):
    engine = make_engine(ours)
    add(
        engine,
        "a",
        specs[3][0],
        SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=True, top_logprobs=2),
    )
    out = engine.run_to_completion()["a"]
    assert len(out.logprobs) == len(out.token_ids) == 4
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.top[0][0] == tok and lp.logprob == pytest.approx(lp.top[0][1])
        assert lp.top[0][1] >= lp.top[1][1]


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_run_to_completion_refuses_to_spin_on_missing_media(ours, specs, overlap: bool):
    engine = make_engine(ours, overlap=overlap)
    add(engine, "late", specs[3][0], greedy(2), with_embeds=False)
    with pytest.raises(RuntimeError, match="never attached"):
        engine.run_to_completion()


def _steps(engine: LLMEngine) -> list[list[tuple]]:
    """Every step's outputs until the engine is done, as comparable tuples."""
    steps = []
    while engine.has_unfinished_requests:
        steps.append(
            [
                (o.request_id, o.new_token_ids, o.new_text, o.finished, o.finish_reason)
                + (o.stop_reason, o.num_cached_tokens, o.logprobs)
                for o in engine.step()
            ]
        )
    assert engine.kv.pool.num_free_blocks == engine.kv.num_blocks
    return steps


def test_overlapped_outputs_equal_the_synchronous_steps(ours, specs):
    _, _, tok = ours
    engine = make_engine(ours)
    add(engine, "full", specs[1][0], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    text = engine.run_to_completion()["full"].text
    stop = next(t for i in range(4, len(text) - 3) if (t := text[i : i + 3]).strip())
    (think,), (end,) = (
        tok.encode(m, add_special_tokens=False).ids for m in ("<think>", "</think>")
    )
    question = tok.encode("Think about the colour of the sky", add_special_tokens=False).ids
    free = dict(temperature=0, ignore_eos=True)
    requests = [
        ("stop", specs[1][0], SamplingParams(max_tokens=16, stop=[stop], **free)),
        (
            "logprobs",
            specs[3][0],
            SamplingParams(max_tokens=6, logprobs=True, top_logprobs=3, **free),
        ),
        ("seeded", specs[0][0], SamplingParams(temperature=1.2, max_tokens=9, seed=5)),
        (
            "penalties",
            specs[8][0],
            SamplingParams(
                temperature=0.8,
                max_tokens=7,
                seed=1,
                repetition_penalty=1.3,
                presence_penalty=0.5,
                frequency_penalty=0.3,
                ignore_eos=True,
            ),
        ),  # fmt: skip
        ("short", specs[5][0], SamplingParams(max_tokens=2, **free)),
        ("eos", specs[13][0], greedy(12)),
    ]
    forced = SamplingParams(
        max_tokens=8, logprobs=True, forced=ForcedTokens(think, end, thinking_budget=2), **free
    )
    runs = []
    for overlap in (False, True):
        engine = make_engine(ours, overlap=overlap)
        for rid, spec, params in requests:
            add(engine, rid, spec, params)
        engine.add_request("forced", question + [think], forced)
        runs.append(_steps(engine))
    sync, overlapped = runs
    assert any(out[4:6] == ("stop", stop) for step in sync for out in step)
    assert [[o[:7] for o in step] for step in overlapped] == [[o[:7] for o in s] for s in sync]
    for step_o, step_s in zip(overlapped, sync, strict=True):
        for o, s in zip(step_o, step_s, strict=True):
            assert (o[7] is None) == (s[7] is None)
            for lp_o, lp_s in zip(o[7] or [], s[7] or [], strict=True):
                assert lp_o.logprob == pytest.approx(lp_s.logprob, abs=1e-5)
                assert [t for t, _ in lp_o.top] == [t for t, _ in lp_s.top]


def test_overlap_with_requests_added_and_aborted_between_steps(ours, specs, expected):
    done = []
    for overlap in (False, True):
        engine = make_engine(ours, max_num_batched_tokens=64, overlap=overlap)
        for i in (0, 3, 5):
            add(engine, str(i), specs[i][0], greedy(specs[i][1]))
        add(engine, "long", specs[2][0], SamplingParams(temperature=0, max_tokens=40))
        outputs = [o for _ in range(3) for o in engine.step()]
        assert engine.abort_request("long")
        add(engine, "8", specs[8][0], greedy(specs[8][1]))
        after = engine.step()
        assert [o.finish_reason for o in after if o.request_id == "long"] == ["abort"]
        early: dict[str, tuple[list[int], str]] = {}
        for o in outputs + after:
            tokens, text = early.get(o.request_id, ([], ""))
            early[o.request_id] = (tokens + o.new_token_ids, text + o.new_text)
        result = {}
        for rid, acc in engine.run_to_completion().items():
            tokens, text = early.get(rid, ([], ""))
            result[rid] = (tokens + acc.token_ids, text + acc.text, acc.finish_reason)
        assert engine.kv.pool.num_free_blocks == engine.kv.num_blocks
        done.append(result)
    assert done[1] == done[0]
    for i in (0, 3, 5, 8):
        assert done[1][str(i)][0] == expected[i]


# Everything at once, as under a served load: requests arriving between steps, several of them
# holding the same image (prefix-cache sharing while another request is still prefilling it),
# embeddings attached late, prefills chunked by a small budget, a pool small enough to preempt,
# and an abort. Every finished request must produce exactly its greedy tokens alone (the
# transformers reference) and every block must come back.
@pytest.mark.parametrize(("seed", "overlap"), [(0, False), (1, True), (2, True)])
def test_staggered_shared_media_chunked_preempting_load_gives_identical_outputs(
    ours, specs, expected, seed: int, overlap: bool
):
    rng = random.Random(seed)
    # the image prompts three times each (two identical copies of one image in the set already)
    order = [i for i, (spec, _) in enumerate(specs) if spec.items] * 3
    order += [i for i, (spec, _) in enumerate(specs) if not spec.items]
    rng.shuffle(order)
    largest = max(-(-(len(s.prompt_ids) + n) // 4) for s, n in specs)  # blocks of the longest
    engine = make_engine(
        ours, block_size=4, num_blocks=largest + 8, max_num_batched_tokens=24, overlap=overlap
    )
    late: dict[str, list] = {}  # request id -> its media items, attached some steps later
    rid_of: dict[str, int] = {}
    aborted = f"r{rng.randrange(len(order))}"
    pending = list(enumerate(order))
    outputs: dict[str, list[int]] = {}
    steps = 0
    while pending or engine.has_unfinished_requests:
        for _ in range(rng.randint(0, 3)):  # arrivals between steps
            if not pending:
                break
            n, i = pending.pop(0)
            rid = f"r{n}"
            rid_of[rid] = i
            spec, max_tokens = specs[i]
            if spec.items and rng.random() < 0.4:
                items = spec.fresh_items()
                late[rid] = [(k, item.embeds) for k, item in enumerate(items)]
                for item in items:
                    item.embeds = None
                engine.add_request(
                    rid, spec.prompt_ids, greedy(max_tokens), items, spec.positions, spec.rope_delta
                )
            else:
                add(engine, rid, spec, greedy(max_tokens))
        for rid in [r for r in late if rng.random() < 0.3]:
            for k, embeds in late.pop(rid):
                if rid in engine.scheduler.requests:  # not the aborted one
                    engine.attach_media(rid, k, embeds)
        if steps == 5 and aborted in rid_of and aborted in engine.scheduler.requests:
            engine.abort_request(aborted)
        if not engine.has_unfinished_requests:
            continue
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        steps += 1
        assert steps < 5000, "the load did not finish"
    assert engine.scheduler.num_preemptions > 0  # the pool was small enough to preempt
    assert engine.kv.pool.num_free_blocks == engine.kv.num_blocks  # nothing leaked
    for rid, i in rid_of.items():
        if rid != aborted:
            assert outputs[rid] == expected[i], (rid, i)
