"""Forced tokens on the tiny checkpoint: a thinking budget and a required / named tool call.

The prompt "enters" thinking by ending in `<think>` (or closes it with `<think></think>\\n`).
Expected tokens come from transformers: the free greedy run before the forced tokens, its greedy
continuation after them, and its log-softmax over the whole output for every log-probability
(forced positions included). Token ids of the markers come from the checkpoint's tokenizer.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from decoder_service.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from decoder_service.engine.engine import CompletedRequest, LLMEngine
from decoder_service.engine.errors import InvalidSamplingParamsError
from decoder_service.engine.request import ForcingState, ReasoningPhase
from decoder_service.engine.sampling_params import ForcedTokens, SamplingParams

QUESTION = "Think about the colour of the sky and answer"


@pytest.fixture(scope="module")
def ids(ours) -> dict[str, list[int]]:
    _, _, tok = ours

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    return {
        "question": enc(QUESTION),
        "think": enc("<think>"),
        "end": enc("</think>"),
        "nl": enc("\n"),
        "call": enc("<tool_call>"),
        "named": enc("<tool_call>get_weather\n"),
        "assistant": enc("<|assistant|>"),
    }


def policy(ids, **kw) -> ForcedTokens:
    (start,), (end,), (turn,) = ids["think"], ids["end"], ids["assistant"]
    return ForcedTokens(start, end, after_think_end=tuple(ids["nl"]), turn_start_id=turn, **kw)


def engine_for(ours, num_blocks: int = 256, block_size: int = 16) -> LLMEngine:
    model, model_config, tok = ours
    config = EngineConfig(
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=512),
    )
    return LLMEngine(model, model_config, config, tok)


def run(ours, requests: dict[str, tuple[list[int], SamplingParams]], **kw):
    engine = engine_for(ours, **kw)
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    done = engine.run_to_completion()
    assert engine.kv.pool.num_free_blocks == engine.kv.num_blocks
    return done, engine.stats().num_preemptions


def one(ours, prompt: list[int], params: SamplingParams) -> CompletedRequest:
    return run(ours, {"r": (prompt, params)})[0]["r"]


def greedy(n: int, forced: ForcedTokens | None = None, logprobs: bool = False) -> SamplingParams:
    return SamplingParams(
        temperature=0, max_tokens=n, ignore_eos=True, forced=forced, logprobs=logprobs
    )


def hf_greedy(reference, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = reference.model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=n, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


def hf_logprobs(reference, prompt: list[int], output: list[int]) -> list[float]:
    """log p(output[i] | prompt + output[:i]) under transformers' model."""
    with torch.no_grad():
        logits = reference.model(input_ids=torch.tensor([prompt + output])).logits[0]
    rows = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1 : -1]
    return rows[torch.arange(len(output)), torch.tensor(output)].tolist()


@pytest.mark.parametrize("budget", [0, 3])
def test_budget_forces_think_end_at_exactly_the_budget(ours, reference, ids, budget):
    prompt = ids["question"] + ids["think"]
    n = budget + 8
    free = hf_greedy(reference, prompt, n)
    assert ids["end"][0] not in free[:budget]  # the model would not close thinking itself
    out = one(ours, prompt, greedy(n, policy(ids, thinking_budget=budget), logprobs=True))
    closed = budget + 1 + len(ids["nl"])
    assert out.token_ids[:budget] == free[:budget]
    assert out.token_ids[budget:closed] == ids["end"] + ids["nl"]
    # then the model answers, exactly as it continues the forced text on its own
    assert out.token_ids[closed:] == hf_greedy(
        reference, prompt + out.token_ids[:closed], n - closed
    )
    assert len(out.token_ids) == n and out.finish_reason == "length"
    assert out.text.count("</think>") == 0  # special tokens are skipped by default
    # logprobs stay aligned with the tokens, forced ones included
    got = [lp.logprob for lp in out.logprobs]
    assert got == pytest.approx(hf_logprobs(reference, prompt, out.token_ids), abs=1e-4)


def test_forced_tokens_show_in_the_text_and_count_towards_max_tokens(ours, ids):
    prompt = ids["question"] + ids["think"]
    params = SamplingParams(
        temperature=0,
        max_tokens=3,
        ignore_eos=True,
        skip_special_tokens=False,
        forced=policy(ids, thinking_budget=2),
    )
    out = one(ours, prompt, params)
    assert out.token_ids[2] == ids["end"][0] and len(out.token_ids) == 3
    assert out.text.endswith("</think>") and out.finish_reason == "length"


def test_no_budget_applies_outside_an_open_think_block(ours, reference, ids):
    # thinking closed in an earlier turn, then a new assistant turn that has not opened it
    history = ids["question"] + ids["think"] + ids["end"] + ids["assistant"] + ids["nl"]
    free = hf_greedy(reference, history, 6)
    assert ids["think"][0] not in free
    assert one(ours, history, greedy(6, policy(ids, thinking_budget=0))).token_ids == free


def test_required_tool_call_is_forced_when_the_prompt_closed_thinking(ours, reference, ids):
    prompt = ids["question"] + ids["assistant"] + ids["nl"] + ids["think"] + ids["end"] + ids["nl"]
    free = hf_greedy(reference, prompt, 4)
    assert free[0] != ids["call"][0]
    out = one(ours, prompt, greedy(6, policy(ids, after_reasoning=tuple(ids["call"]))))
    assert out.token_ids[:1] == ids["call"]
    assert out.token_ids[1:] == hf_greedy(reference, prompt + ids["call"], 5)


def test_named_tool_call_forces_the_name_after_a_budgeted_think(ours, reference, ids):
    prompt = ids["question"] + ids["think"]
    forced = policy(ids, thinking_budget=2, after_reasoning=tuple(ids["named"]))
    out = one(ours, prompt, greedy(12, forced, logprobs=True))
    head = ids["end"] + ids["nl"] + ids["named"]
    assert out.token_ids[:2] == hf_greedy(reference, prompt, 2)
    assert out.token_ids[2 : 2 + len(head)] == head
    got = [lp.logprob for lp in out.logprobs]
    assert got == pytest.approx(hf_logprobs(reference, prompt, out.token_ids), abs=1e-4)


def test_forced_requests_in_a_batch_with_preemption_match_running_alone(ours, ids):
    think = ids["question"] + ids["think"]
    requests = {
        "budget": (think, greedy(20, policy(ids, thinking_budget=5))),
        "required": (think, greedy(20, policy(ids, thinking_budget=1, after_reasoning=(7, 8)))),
        "plain": (ids["question"], greedy(20)),
        "plain2": (ids["question"][::-1], greedy(20)),
    }
    alone = {rid: one(ours, *req).token_ids for rid, req in requests.items()}
    batched, preemptions = run(ours, requests, num_blocks=14, block_size=4)
    assert preemptions > 0
    assert {rid: c.token_ids for rid, c in batched.items()} == alone


def test_forcing_state_follows_generated_think_markers():
    start, end, nl, call, turn = 1, 2, 3, 4, 9
    forced = ForcedTokens(start, end, 2, (nl,), (call,), turn)
    # no open block at the end of the prompt: the earlier turn's <think> is history
    state = ForcingState(forced, [5, start, 6, turn, 7])
    assert state.phase is ReasoningPhase.NOT_STARTED
    got = [state.choose(t) for t in (8, start, 10, end, 11, 12)]
    # the model closed thinking itself under budget: newline and tool call follow it
    assert got == [8, start, 10, end, nl, call]
    assert [state.choose(t) for t in (13, end)] == [13, end]  # nothing more is forced
    # without a tool to call, a generated </think> is left alone
    state = ForcingState(ForcedTokens(start, end, 5, (nl,)), [start])
    assert [state.choose(t) for t in (10, end, 11)] == [10, end, 11]


def test_invalid_forcing_values_are_refused():
    with pytest.raises(InvalidSamplingParamsError) as err:
        SamplingParams(forced=ForcedTokens(1, 2, thinking_budget=-1)).validate(100)
    assert err.value.param == "thinking_budget"
    with pytest.raises(InvalidSamplingParamsError) as err:
        SamplingParams(forced=ForcedTokens(1, 2, after_reasoning=(100,))).validate(100)
    assert err.value.param == "forced"


def test_sampling_params_with_forcing_survive_pickling(ids):
    # tensor-parallel workers receive the params inside each SchedulerOutput
    params = greedy(4, policy(ids, thinking_budget=3, after_reasoning=tuple(ids["named"])))
    assert pickle.loads(pickle.dumps(params)) == params
