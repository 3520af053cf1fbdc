"""Load the text model, its processor and tokenizer, and build the ``LLMEngine`` that serves them.

Contract: ``load_engine(config)`` (blocking; run it in a thread) returns a ``LoadedModel``: the
engine (rank 0's, with tensor parallelism), the ``MultimodalProcessor`` (chat template, tokenizer,
placeholder expansion) and the parsed ``ModelConfig``. Only the text half of the checkpoint is
loaded: vision runs in the encoder service. ``LoadedModel.close()`` stops what loading
started (the worker ranks of ``--tp`` > 1).
Not here: serving, the engine's own logic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from decoder_service.config import DecoderServiceConfig
from decoder_service.engine.cli_args import resolve_device
from decoder_service.engine.engine import LLMEngine
from decoder_service.engine.workers import load_text_model
from models.glm4v.config import ModelConfig, load_model_config
from models.glm4v.processing.processor import MultimodalProcessor

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    engine: LLMEngine
    processor: MultimodalProcessor
    model_config: ModelConfig

    def close(self) -> None:
        self.engine.close()  # stops the worker ranks of a tensor-parallel engine


def load_engine(config: DecoderServiceConfig) -> LoadedModel:
    load = config.engine.load
    processor = MultimodalProcessor.from_pretrained(load.model_path)
    model_config = load_model_config(load.model_path)
    if config.engine.parallel.tp > 1:
        # rank 0 here; ranks 1..tp-1 are processes the engine spawns and mirrors every step on
        from decoder_service.engine.parallel import load_parallel_engine

        engine = load_parallel_engine(config.engine, model_config, processor.tokenizer)
        return LoadedModel(engine, processor, model_config)
    device = resolve_device(load.device)
    model = load_text_model(load, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    engine = LLMEngine(model, model_config, config.engine, tokenizer=processor.tokenizer)
    log.info(
        "model loaded: %s on %s (%s), %d KV blocks, context %d",
        load.model_path,
        device,
        engine.runner.dtype,
        engine.kv.num_blocks,
        engine.max_model_len,
    )
    return LoadedModel(engine, processor, model_config)
