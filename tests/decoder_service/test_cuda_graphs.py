"""Decode CUDA graphs: batch-size buckets, the ``--enforce-eager`` switch, and graph steps
against eager steps.

CPU: the bucket and padding functions against brute force; the flag reaches the config and the
decode settings; a CPU runner never captures; and the padded static-buffer forward that the
graphs replay (run eagerly here: lm_head and argmax included) gives the same tokens as the
normal eager steps for mixed batches of 3, 5 and 33 requests (text and image prompts of different
lengths, requests finishing at different steps, so the batch shrinks through padded sizes), all
greedy or mixed with seeded random, penalised and log-probability rows.
GPU: the same batches with captured graphs against ``--enforce-eager`` on both tiny checkpoints
(bfloat16), and the Triton decode kernel against the SDPA path inside the model (float32).
"""

from __future__ import annotations

import argparse

import pytest
import torch
from engine_reference import PromptSpec, draw_image

from decoder_service.engine.cli_args import add_engine_arguments, engine_config_from_args
from decoder_service.engine.config import (
    CacheConfig,
    EngineConfig,
    ExecutionConfig,
    SchedulerConfig,
)
from decoder_service.engine.cuda_graphs import (
    DecodeGraphs,
    DecodeSettings,
    capture_sizes,
    decode_settings,
    padded_size,
)
from decoder_service.engine.engine import CompletedRequest, LLMEngine
from decoder_service.engine.input_buffers import DecodeBuffers
from decoder_service.engine.sampling_params import SamplingParams
from models.layers.attention import Attention

MAX_SEQS = 40  # graph sizes 1, 2, 4, 8, 16, 24, 32, 40: a batch of 33 pads to 40
MAX_LEN = 512


def test_capture_sizes_and_padding_against_brute_force() -> None:
    assert capture_sizes(256)[:9] == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    for max_seqs in (1, 3, 5, 24, 33, 40, 100, 256):
        sizes = capture_sizes(max_seqs)
        assert list(sizes) == sorted(set(sizes)) and sizes[-1] == max_seqs
        assert all(b - a <= 16 for a, b in zip(sizes, sizes[1:], strict=False))
        for batch in range(1, max_seqs + 2):
            fits = [s for s in sizes if s >= batch]
            assert padded_size(batch, sizes) == (min(fits) if fits else None)


def test_decode_buffers_pad_to_the_scratch_block() -> None:
    buffers = DecodeBuffers(8, 6, pad_slot=400, pad_block=100, device=torch.device("cpu"))
    i64 = torch.tensor
    buffers.load(
        4,
        i64([7, 8, 9]).numpy(),
        torch.arange(9).view(3, 3).numpy(),
        i64([1, 2, 3]).numpy(),
        i64([0, 2]).numpy(),
        i64([5, 6, 7], dtype=torch.int32).numpy(),
        i64([[1, 2], [3, 4], [5, 6]], dtype=torch.int32).numpy(),
    )
    v = buffers.batch(4)
    assert v.ids.tolist() == [7, 8, 9, 0]
    assert v.positions.tolist() == [[0, 1, 2, 0], [3, 4, 5, 0], [6, 7, 8, 0]]
    assert v.slots.tolist() == [1, 2, 3, 400] and v.seq_lens.tolist() == [5, 6, 7, 1]
    assert v.tables[:, :2].tolist() == [[1, 2], [3, 4], [5, 6], [100, 0]]
    assert v.logits_rows[:2].tolist() == [0, 2]


def _parse(*flags: str) -> EngineConfig:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return engine_config_from_args(parser.parse_args(["--model-path", "m", *flags]))


def test_enforce_eager_flag_reaches_the_config_and_the_settings() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    default, eager = _parse().execution, _parse("--enforce-eager").execution
    sdpa = _parse("--decode-attention", "sdpa").execution
    assert not default.enforce_eager and eager.enforce_eager and sdpa.decode_attention == "sdpa"
    assert decode_settings(default, cuda, 4096, 33).graph_sizes == capture_sizes(33)
    assert decode_settings(eager, cuda, 4096, 33).graph_sizes == ()
    assert decode_settings(sdpa, cuda, 4096, 33).graph_sizes == ()
    assert decode_settings(default, cpu, 4096, 33).graph_sizes == ()
    assert not decode_settings(sdpa, cuda, 4096, 33).decode_kernel


def _build(reference) -> list[PromptSpec]:
    long_text = "Read the question carefully and answer in one short sentence. " * 4
    parts = [
        [("text", "Hello there")],
        [("image", draw_image(90, 60, 0)), ("text", "What is this?")],
        [("text", long_text + "Why is the sky blue?")],
        [("image", draw_image(40, 160, 1)), ("text", "Is it tall?")],
        [("text", "Count to ten.")],
    ]
    return [reference.build(p) for p in parts]


@pytest.fixture(scope="module")
def prompts(reference) -> list[PromptSpec]:
    return _build(reference)


def _engine(model, model_config, execution: ExecutionConfig, num_blocks=512) -> LLMEngine:
    config = EngineConfig(
        cache=CacheConfig(num_blocks=num_blocks),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=4096, max_running_requests=MAX_SEQS, max_model_len=MAX_LEN
        ),
        execution=execution,
    )
    return LLMEngine(model, model_config, config)


def _mixed(i: int) -> dict:
    """Sampling settings that leave the graph's greedy picks unused for some batches."""
    return [
        {},
        {"temperature": 0.9, "top_p": 0.9, "seed": 100 + i},
        {"repetition_penalty": 1.3},
        {"logprobs": True, "top_logprobs": 3},
    ][i % 4]


def _run(engine: LLMEngine, prompts, n: int, logprobs=False, mixed=False) -> list[CompletedRequest]:
    for i in range(n):
        spec = prompts[i % len(prompts)]
        params = SamplingParams(
            **{
                "temperature": 0,
                "max_tokens": 2 + i % 6,  # requests finish at different steps: the batch shrinks
                "ignore_eos": True,
                "logprobs": logprobs,
                "top_logprobs": 5 if logprobs else 0,
                **(_mixed(i) if mixed else {}),
            }
        )
        items = spec.fresh_items()
        engine.add_request(str(i), spec.prompt_ids, params, items, spec.positions, spec.rope_delta)
    done = engine.run_to_completion()
    assert engine.kv.pool.num_free_blocks == engine.kv.num_blocks
    return [done[str(i)] for i in range(n)]


def test_cpu_runner_never_captures(ours, monkeypatch) -> None:
    class _NoCapture(Exception):
        pass

    def refuse(*args, **kwargs):
        raise _NoCapture  # not a RuntimeError: nothing would swallow it

    monkeypatch.setattr(DecodeGraphs, "__init__", refuse)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", refuse)
    model, model_config, _ = ours
    engine = _engine(model, model_config, ExecutionConfig())
    assert not engine.uses_cuda_graphs and engine.runner.graphs is None
    # even settings that ask for graphs capture nothing on a CPU device
    asked = DecodeSettings(MAX_LEN, True, capture_sizes(MAX_SEQS))
    assert engine.runner.configure_decode(asked) is False and engine.runner.graphs is None
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=3))
    assert len(engine.run_to_completion()["a"].token_ids) == 3


@pytest.mark.parametrize(
    ("n", "mixed"), [(3, False), (5, False), (33, False), (3, True), (33, True)]
)
def test_padded_static_decode_equals_eager_steps_on_cpu(ours, prompts, n: int, mixed) -> None:
    model, model_config, _ = ours
    eager = _engine(model, model_config, ExecutionConfig())
    want = [r.token_ids for r in _run(eager, prompts, n, mixed=mixed)]
    engine = _engine(model, model_config, ExecutionConfig())
    runner = engine.runner
    cols = -(-MAX_LEN // runner.block_size)
    buffers = DecodeBuffers(MAX_SEQS, cols, runner.pad_slot, runner.num_blocks, runner.device)
    graphs = DecodeGraphs(model, buffers, runner.decode_splits, MAX_LEN, capture=False)
    graphs.capture(capture_sizes(MAX_SEQS))
    runner.graphs = graphs
    staged: list[tuple[int, int | None]] = []  # (batch, graph size) of each decode step
    stage = graphs.stage

    def recording_stage(*arrays):
        size = stage(*arrays)
        staged.append((len(arrays[0]), size))
        return size

    graphs.stage = recording_stage
    got = [r.token_ids for r in _run(engine, prompts, n, mixed=mixed)]
    assert got == want
    assert graphs.replays > 0 and any(size and size > b for b, size in staged)  # padded


# ---- GPU --------------------------------------------------------------------------------------

LOGPROB_TOL = 0.1


def _assert_same_greedy(got: list[CompletedRequest], want: list[CompletedRequest]) -> None:
    """Same tokens with close log-probabilities; a bf16 near tie may fork one request, but only
    between two tokens the reference itself ranks within the tolerance, and rarely."""
    forks = 0
    for g, w in zip(got, want, strict=True):
        assert len(g.token_ids) == len(w.token_ids)
        for tok, lp_g, lp_w, ref in zip(
            g.token_ids, g.logprobs, w.logprobs, w.token_ids, strict=True
        ):
            if tok != ref:
                alternatives = dict(lp_w.top)
                assert tok in alternatives and lp_w.logprob - alternatives[tok] < LOGPROB_TOL
                forks += 1
                break
            assert abs(lp_g.logprob - lp_w.logprob) < LOGPROB_TOL
    assert forks <= max(1, len(got) // 10)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["45", "46"])
def test_gpu_graph_steps_equal_eager_steps(request, variant: str) -> None:
    from models.glm4v.config import load_model_config
    from models.glm4v.loader import load_model

    ckpt = request.getfixturevalue(f"tiny_ckpt_{variant}")
    specs = _build(request.getfixturevalue("reference" if variant == "45" else "reference_46"))
    model = load_model(ckpt, dtype=torch.bfloat16, device="cuda", vision=False)
    model_config = load_model_config(ckpt)
    for n in (3, 5, 33):
        eager_engine = _engine(model, model_config, ExecutionConfig(enforce_eager=True))
        assert not eager_engine.uses_cuda_graphs
        want = _run(eager_engine, specs, n, logprobs=True)
        engine = _engine(model, model_config, ExecutionConfig())
        assert engine.uses_cuda_graphs and engine.runner.graphs.sizes == capture_sizes(MAX_SEQS)
        got = _run(engine, specs, n, logprobs=True)
        assert engine.runner.graphs.replays > 0
        _assert_same_greedy(got, want)


@pytest.mark.gpu
def test_gpu_triton_decode_equals_sdpa_inside_the_model(tiny_ckpt_45, prompts, monkeypatch):
    from models.glm4v.config import load_model_config
    from models.glm4v.loader import load_model

    calls = []
    kernel = Attention._paged_decode

    def counted(*args):
        calls.append(1)
        return kernel(*args)

    monkeypatch.setattr(Attention, "_paged_decode", counted)
    model = load_model(tiny_ckpt_45, dtype=torch.float32, device="cuda", vision=False)
    model_config = load_model_config(tiny_ckpt_45)
    sdpa = ExecutionConfig(enforce_eager=True, decode_attention="sdpa")
    want = _run(_engine(model, model_config, sdpa), prompts, 33, logprobs=True)
    assert not calls
    triton_eager = ExecutionConfig(enforce_eager=True)
    got = _run(_engine(model, model_config, triton_eager), prompts, 33, logprobs=True)
    assert calls
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    for g, w in zip(got, want, strict=True):
        for lp_g, lp_w in zip(g.logprobs, w.logprobs, strict=True):
            assert lp_g.logprob == pytest.approx(lp_w.logprob, abs=1e-3)
