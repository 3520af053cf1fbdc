"""LLMEngine on a GPU (skipped without CUDA): a memory-sized pool, host-parked vision features and
bfloat16, against the same transformers greedy tokens as the CPU engine tests."""

from __future__ import annotations

import pytest
import torch
from engine_cases import add, greedy, run_batch

from decoder_service.engine.config import CacheConfig, EngineConfig
from decoder_service.engine.engine import LLMEngine


@pytest.mark.gpu
def test_gpu_engine_sizes_its_pool_from_memory_and_matches_reference(tiny_ckpt_45, specs, expected):
    from tokenizers import Tokenizer

    from models.glm4v.config import load_model_config
    from models.glm4v.loader import load_model

    model = load_model(tiny_ckpt_45, dtype=torch.float32, device="cuda", vision=False)
    config = EngineConfig(cache=CacheConfig(num_blocks=None, mem_fraction_static=0.05))
    tok = Tokenizer.from_file(str(tiny_ckpt_45 / "tokenizer.json"))
    engine = LLMEngine(model, load_model_config(tiny_ckpt_45), config, tok)
    assert engine.kv.num_blocks > 100
    assert run_batch(engine, specs) == expected


@pytest.mark.gpu
def test_gpu_engine_keeps_host_parked_features_in_host_memory(tiny_ckpt_45, specs, expected):
    from models.glm4v.config import load_model_config
    from models.glm4v.loader import load_model

    model = load_model(tiny_ckpt_45, dtype=torch.float32, device="cuda", vision=False)
    config = EngineConfig(cache=CacheConfig(num_blocks=256, block_size=16))
    engine = LLMEngine(model, load_model_config(tiny_ckpt_45), config)
    (parked, n_parked), (on_gpu, n_gpu) = specs[8], specs[5]  # a video, an image
    add(engine, "parked", parked, greedy(n_parked), with_embeds=False)
    add(engine, "gpu", on_gpu, greedy(n_gpu), with_embeds=False)
    engine.attach_media("parked", 0, parked.items[0].embeds.cpu())
    engine.attach_media("gpu", 0, on_gpu.items[0].embeds.cuda())
    items = {rid: engine.scheduler.requests[rid].mm_items[0] for rid in ("parked", "gpu")}
    assert items["parked"].embeds.device.type == "cpu"  # prefill copies the rows it needs
    assert items["gpu"].embeds.device.type == "cuda"
    done = engine.run_to_completion()
    assert done["parked"].token_ids == expected[8] and done["gpu"].token_ids == expected[5]


@pytest.mark.gpu
def test_gpu_bfloat16_batch_runs_to_completion(tiny_ckpt_45, specs):
    from models.glm4v.config import load_model_config
    from models.glm4v.loader import load_model

    model = load_model(tiny_ckpt_45, dtype=torch.bfloat16, device="cuda", vision=False)
    config = EngineConfig(cache=CacheConfig(num_blocks=256, block_size=16))
    engine = LLMEngine(model, load_model_config(tiny_ckpt_45), config)
    outs = run_batch(engine, specs)
    assert all(1 <= len(toks) <= n for toks, (_, n) in zip(outs, specs, strict=True))
