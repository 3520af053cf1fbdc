"""Tensor and expert parallelism in the engine: two gloo ranks give the single-process tokens.

Rank 0 is this test process; ``start_workers`` spawns rank 1. The batch mixes a text request and
an image request whose embeddings arrive after admission, under a step budget small enough to cut
the image across prefill chunks and a KV pool small enough to preempt, so media reach the worker
late, in pieces and twice. Greedy tokens and their log-probabilities must match a one-process
engine on the same checkpoint, also when rank 0 launches each next step before its outputs. A
worker that dies mid-run must make rank 0 raise, within bounds.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from engine_reference import draw_image

from decoder_service.engine.config import (
    CacheConfig,
    EngineConfig,
    ExecutionConfig,
    LoadConfig,
    ParallelConfig,
    SchedulerConfig,
)
from decoder_service.engine.engine import LLMEngine
from decoder_service.engine.parallel import ParallelWorkerError, load_parallel_engine
from decoder_service.engine.sampling_params import SamplingParams
from decoder_service.mm_local import PreparedPrompt, prepare_prompt
from glimpse.cli import main
from models.distributed import get_tp_size
from models.glm4v.config import load_model_config
from models.glm4v.loader import load_model
from models.glm4v.processing.processor import MultimodalProcessor

pytestmark = pytest.mark.timeout(120)

MAX_TOKENS = 8
BUDGET = 10  # tokens per step: a 12-token image is cut across prefill chunks


def engine_config(
    ckpt: Path, tp: int = 1, ep: int = 1, num_blocks: int = 64, overlap: bool = False
) -> EngineConfig:
    return EngineConfig(
        load=LoadConfig(model_path=str(ckpt), dtype="float32", device="cpu"),
        cache=CacheConfig(block_size=4, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=BUDGET),
        parallel=ParallelConfig(tp=tp, ep=ep),
        execution=ExecutionConfig(overlap_outputs=overlap),
    )


def prompts(ckpt: Path, tmp_path: Path) -> list[PreparedPrompt]:
    processor = MultimodalProcessor.from_pretrained(ckpt)
    tower = load_model(ckpt, torch.float32, "cpu", vision=True, text=False).visual
    picture = tmp_path / "picture.png"
    draw_image(120, 80, seed=4).save(picture)
    return [
        prepare_prompt(processor, None, "Tell me a short story about a lighthouse keeper."),
        prepare_prompt(processor, tower, "What is in the picture?", images=[picture]),
    ]


class Generated(NamedTuple):
    token_ids: dict[str, list[int]]
    logprobs: dict[str, list[float]]


def generate(engine: LLMEngine, batch: list[PreparedPrompt]) -> Generated:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=True, ignore_eos=True)
    for i, p in enumerate(batch):
        late = [type(it)(it.content_hash, it.spans, it.modality) for it in p.mm_items]
        engine.add_request(str(i), p.prompt_token_ids, params, late, p.positions, p.rope_delta)
    out = Generated(
        {str(i): [] for i in range(len(batch))}, {str(i): [] for i in range(len(batch))}
    )
    for step in range(200):
        if not engine.has_unfinished_requests:
            return out
        if step == 3:  # the text request ran alone while the image request waited for pixels
            for i, p in enumerate(batch):
                for k, item in enumerate(p.mm_items):
                    engine.attach_media(str(i), k, item.embeds)
        for o in engine.step():
            out.token_ids[o.request_id] += o.new_token_ids
            out.logprobs[o.request_id] += [lp.logprob for lp in o.logprobs or []]
    raise AssertionError("the engine did not finish")


def single_process(ckpt: Path, batch: list[PreparedPrompt], num_blocks: int):
    model = load_model(ckpt, torch.float32, "cpu", vision=False)
    engine = LLMEngine(model, load_model_config(ckpt), engine_config(ckpt, num_blocks=num_blocks))
    done = generate(engine, batch)
    return done, engine.stats().num_preemptions


@pytest.mark.parametrize(
    ("variant", "ep", "num_blocks", "overlap"),
    [("tiny_ckpt_45", 1, 64, False), ("tiny_ckpt_46", 2, 14, False), ("tiny_ckpt_45", 1, 64, True)],
    ids=["glm45v-tp2", "glm46v-tp2-ep2-preempting", "glm45v-tp2-overlap"],
)
def test_two_ranks_give_the_single_process_tokens(
    request, tmp_path, variant, ep, num_blocks, overlap
):
    ckpt = request.getfixturevalue(variant)
    batch = prompts(ckpt, tmp_path)
    assert batch[1].mm_items[0].num_embeds > BUDGET  # no step can hold the whole image
    expected, preemptions = single_process(ckpt, batch, num_blocks)
    assert (preemptions > 0) == (num_blocks < 64)

    config = engine_config(ckpt, tp=2, ep=ep, num_blocks=num_blocks, overlap=overlap)
    engine = load_parallel_engine(config, load_model_config(ckpt))
    try:
        assert get_tp_size() == 2
        done = generate(engine, batch)
        assert engine.stats().num_preemptions == preemptions
    finally:
        engine.close()
    assert get_tp_size() == 1  # the process left the group: later models are whole again
    for rid, tokens in expected.token_ids.items():
        assert len(tokens) == MAX_TOKENS
        assert done.token_ids[rid] == tokens, rid
        diff = torch.tensor(done.logprobs[rid]) - torch.tensor(expected.logprobs[rid])
        assert diff.abs().max().item() < 1e-4, rid


def test_a_dying_worker_makes_rank_0_raise_not_hang(tiny_ckpt_45, tmp_path):
    batch = prompts(tiny_ckpt_45, tmp_path)[:1]
    engine = load_parallel_engine(
        engine_config(tiny_ckpt_45, tp=2), load_model_config(tiny_ckpt_45)
    )
    try:
        worker = engine.executor.workers.processes[0]
        p = batch[0]
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        engine.add_request("a", p.prompt_token_ids, params, [], p.positions, p.rope_delta)
        engine.step()
        # freeze the worker so rank 0 blocks inside a step's collectives, then kill it there
        os.kill(worker.pid, signal.SIGSTOP)
        killer = threading.Timer(1.0, os.kill, (worker.pid, signal.SIGKILL))
        killer.start()
        with pytest.raises(ParallelWorkerError, match="rank 1"):
            for _ in range(200):
                engine.step()
        killer.join()
        with pytest.raises(ParallelWorkerError):  # the group stays unusable
            engine.step()
    finally:
        engine.close()
    assert get_tp_size() == 1


def test_generate_cli_with_tp_2_matches_tp_1(tiny_ckpt_45, tmp_path, capsys):
    import json

    picture = tmp_path / "picture.png"
    draw_image(100, 90, seed=7).save(picture)
    base = [
        "generate", "--model-path", str(tiny_ckpt_45), "--prompt", "What is in the picture?",
        "--image", str(picture), "--max-tokens", "6", "--temperature", "0", "--dtype", "float32",
        "--device", "cpu", "--num-blocks", "64", "--output-format", "json",
    ]  # fmt: skip
    outputs = []
    for tp in ("1", "2"):
        assert main([*base, "--tp", tp]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert get_tp_size() == 1
    assert outputs[1]["token_ids"] == outputs[0]["token_ids"]
    assert len(outputs[0]["token_ids"]) > 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--tp", "3"], "not divisible by 3"), (["--tp", "2", "--ep", "3"], "expert-parallel")],
)
def test_generate_cli_rejects_a_split_the_model_cannot_take(tiny_ckpt_45, capsys, flags, message):
    # the tiny checkpoint has 4 query heads and 2 KV heads: three ranks cannot share them
    argv = ["generate", "--model-path", str(tiny_ckpt_45), "--prompt", "hi", "--device", "cpu"]
    assert main([*argv, "--dtype", "float32", "--num-blocks", "16", *flags]) == 2
    assert message in capsys.readouterr().err
    assert get_tp_size() == 1
