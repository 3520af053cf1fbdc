"""Sampler: greedy, temperature / top-k / top-p / min-p, seeds, penalties, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from decoder_service.engine.errors import InvalidSamplingParamsError
from decoder_service.engine.sampler import Sampler, SamplingRow
from decoder_service.engine.sampling_params import SamplingParams

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()


def draw(params: SamplingParams, n: int = 4000, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    rows = [SamplingRow(params, [], [])] * n
    return torch.tensor(Sampler()(logits.expand(n, -1).clone(), rows).token_ids)


def test_greedy_picks_the_argmax_per_row():
    logits = torch.randn(6, 50)
    rows = [SamplingRow(SamplingParams(temperature=0), [], [])] * 6
    assert Sampler()(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_precomputed_greedy_picks_serve_plain_greedy_batches_and_are_never_written():
    logits = torch.randn(4, 50)
    greedy_rows = [SamplingRow(SamplingParams(temperature=0), [], [])] * 4
    picks = torch.tensor([7, 8, 9, 10])  # not the argmax: shows which tokens were taken
    assert Sampler().launch(logits, greedy_rows, picks).result().token_ids == [7, 8, 9, 10]
    # a penalised or a random row needs the argmax of other logits: the picks are left alone
    penalised = [*greedy_rows[:3], SamplingRow(SamplingParams(repetition_penalty=1.5), [1], [])]
    random = [*greedy_rows[:3], SamplingRow(SamplingParams(temperature=1.0, seed=3), [], [])]
    for rows in (penalised, random):
        got = Sampler().launch(logits, rows, picks).result().token_ids
        assert got[:3] == logits[:3].argmax(-1).tolist()
        assert picks.tolist() == [7, 8, 9, 10]


def test_temperature_one_follows_the_distribution():
    torch.manual_seed(0)
    freq = torch.bincount(draw(SamplingParams(temperature=1.0)), minlength=4) / 4000
    assert torch.allclose(freq, PROBS, atol=0.03)


def test_low_temperature_sharpens_high_flattens():
    torch.manual_seed(0)
    cold = (draw(SamplingParams(temperature=0.2)) == 0).float().mean()
    hot = (draw(SamplingParams(temperature=5.0)) == 0).float().mean()
    assert cold > 0.9 and hot < 0.4


def test_top_k_top_p_min_p_exclude_tail_tokens():
    torch.manual_seed(0)
    assert set(draw(SamplingParams(top_k=2)).tolist()) == {0, 1}
    # mass before token 2 is 0.8 >= 0.75: tokens 2 and 3 are outside the nucleus
    assert set(draw(SamplingParams(top_p=0.75)).tolist()) == {0, 1}
    # 0.05 < 0.2 * 0.5: token 3 is dropped, the others stay
    assert set(draw(SamplingParams(min_p=0.2)).tolist()) == {0, 1, 2}
    assert set(draw(SamplingParams(top_k=1, temperature=1.0), n=200).tolist()) == {0}


def test_seeded_rows_are_reproducible_and_independent_of_the_batch():
    logits = torch.randn(1, 100)
    params = SamplingParams(temperature=1.0, seed=1234)
    history = [3, 4, 5]
    alone = Sampler()(logits, [SamplingRow(params, [1], history)]).token_ids
    torch.manual_seed(99)  # global RNG state must not matter
    others = torch.randn(3, 100)
    batch = torch.cat([others[:1], logits, others[1:]])
    rows = [SamplingRow(SamplingParams(temperature=1.0), [], [])] * 3
    rows.insert(1, SamplingRow(params, [1], history))
    assert Sampler()(batch, rows).token_ids[1] == alone[0]
    seqs = {
        seed: [
            Sampler()(logits, [SamplingRow(SamplingParams(seed=seed), [], [0] * k)]).token_ids[0]
            for k in range(20)
        ]
        for seed in (1, 2)
    }
    assert seqs[1] != seqs[2]


def test_repetition_penalty_demotes_seen_tokens_of_either_sign():
    logits = torch.tensor([[2.0, 1.9, -1.0, -1.1]])
    rows = [SamplingRow(SamplingParams(temperature=0, repetition_penalty=2.0), [0], [])]
    assert Sampler()(logits.clone(), rows).token_ids == [1]
    neg = torch.tensor([[-1.0, -1.1, -5.0, -6.0]])
    rows = [SamplingRow(SamplingParams(temperature=0, repetition_penalty=2.0), [], [0])]
    assert Sampler()(neg.clone(), rows).token_ids == [1]  # -1 * 2 = -2 < -1.1


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    prompt_only = SamplingRow(SamplingParams(temperature=0, presence_penalty=1.0), [0, 0], [])
    assert Sampler()(logits.clone(), [prompt_only]).token_ids == [0]
    once = SamplingRow(SamplingParams(temperature=0, frequency_penalty=0.4), [], [0])
    assert Sampler()(logits.clone(), [once]).token_ids == [0]  # 3.0 - 0.4 > 2.5
    twice = SamplingRow(SamplingParams(temperature=0, frequency_penalty=0.4), [], [0, 0])
    assert Sampler()(logits.clone(), [twice]).token_ids == [1]  # 3.0 - 0.8 < 2.5


def test_logprobs_are_the_models_distribution():
    logits = torch.randn(2, 30)
    params = SamplingParams(temperature=0, logprobs=True, top_logprobs=3, repetition_penalty=1.5)
    out = Sampler()(logits.clone(), [SamplingRow(params, [], [])] * 2)
    ref = torch.log_softmax(logits, -1)
    for i in range(2):
        assert out.logprobs[i] == pytest.approx(ref[i, out.token_ids[i]].item(), abs=1e-5)
        top = out.top_logprobs[i]
        assert [t for t, _ in top] == ref[i].topk(3).indices.tolist()
        assert top[0][0] == out.token_ids[i]
        assert math.fsum(math.exp(lp) for lp in ref[i].tolist()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"top_logprobs": 50}, "top_logprobs"),
        ({"stop": ("",)}, "stop"),
        ({"stop_token_ids": (10**9,)}, "stop_token_ids"),
    ],
)
def test_invalid_values_raise_typed_errors(kwargs, param):
    with pytest.raises(InvalidSamplingParamsError) as err:
        SamplingParams(**kwargs).validate(vocab_size=1000)
    assert err.value.param == param
