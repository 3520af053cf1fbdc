"""Building blocks of the engine tests: an engine on the tiny model, requests from prompt specs."""

from __future__ import annotations

from engine_reference import PromptSpec

from decoder_service.engine.config import (
    CacheConfig,
    EngineConfig,
    ExecutionConfig,
    MediaLimits,
    SchedulerConfig,
)
from decoder_service.engine.engine import LLMEngine
from decoder_service.engine.sampling_params import SamplingParams


def make_engine(
    ours, block_size=16, num_blocks=512, media=MediaLimits(), overlap=False, **sched
) -> LLMEngine:
    model, model_config, tok = ours
    config = EngineConfig(
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler=SchedulerConfig(**{"max_num_batched_tokens": 2048, **sched}),
        media=media,
        execution=ExecutionConfig(overlap_outputs=overlap),
    )
    return LLMEngine(model, model_config, config, tok)


def add(engine: LLMEngine, rid: str, spec: PromptSpec, params: SamplingParams, with_embeds=True):
    items = spec.fresh_items()
    if not with_embeds:
        for item in items:
            item.embeds = None
    return engine.add_request(rid, spec.prompt_ids, params, items, spec.positions, spec.rope_delta)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n)


def run_batch(engine: LLMEngine, specs) -> list[list[int]]:
    for i, (spec, n) in enumerate(specs):
        add(engine, str(i), spec, greedy(n))
    done = engine.run_to_completion()
    assert engine.kv.pool.num_free_blocks == engine.kv.num_blocks  # nothing leaked
    return [done[str(i)].token_ids for i in range(len(specs))]
