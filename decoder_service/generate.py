"""``glimpse generate``: offline generation from a prompt, images and videos, in one process.

Contract: loads the checkpoint (vision tower only when media are given), renders ``--prompt`` with
the checkpoint's chat template as a single user turn, encodes ``--image`` / ``--video`` files
with the model's own tower (``mm_local.py``), runs ``LLMEngine`` to completion and prints the
text, or with ``--output-format json`` one JSON object with ``text``, ``token_ids``,
``prompt_token_ids``, ``finish_reason`` and timing. ``--batch-size N`` submits the prompt N
times at once (throughput check; the first request is printed). Bad input (unreadable media,
invalid sampling values, a prompt that does not fit) exits with status 2 and a message on
stderr. Engine flags come from ``engine/cli_args.py``; with ``--tp N`` this process is rank 0 and
spawns the other ranks for the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import torch

from decoder_service.engine.cli_args import (
    add_engine_arguments,
    engine_config_from_args,
    resolve_device,
    resolve_dtype,
)
from decoder_service.engine.engine import LLMEngine
from decoder_service.engine.errors import InvalidRequestError
from decoder_service.engine.parallel import start_workers
from decoder_service.engine.sampling_params import SamplingParams
from decoder_service.mm_local import prepare_prompt
from models.glm4v.config import load_model_config
from models.glm4v.errors import GlimpseModelError
from models.glm4v.loader import load_model
from models.glm4v.processing.processor import MultimodalProcessor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    s = SamplingParams()
    g = parser.add_argument_group("input")
    g.add_argument("--prompt", required=True, help="user message text")
    g.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    g.add_argument("--video", action="append", default=[], help="video file (repeatable)")
    g.add_argument(
        "--enable-thinking",
        choices=("on", "off"),
        default=None,
        help="passed to the chat template (default: the template's own default)",
    )
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=s.temperature, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=s.top_p)
    g.add_argument("--top-k", type=int, default=s.top_k)
    g.add_argument("--min-p", type=float, default=s.min_p)
    g.add_argument("--repetition-penalty", type=float, default=s.repetition_penalty)
    g.add_argument("--presence-penalty", type=float, default=s.presence_penalty)
    g.add_argument("--frequency-penalty", type=float, default=s.frequency_penalty)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=s.seed)
    g.add_argument("--ignore-eos", action="store_true")
    g = parser.add_argument_group("output")
    g.add_argument("--output-format", choices=("text", "json"), default="text")
    g.add_argument("--batch-size", type=int, default=1, help="submit the prompt N times at once")
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (GlimpseModelError, ValueError, OSError) as exc:  # ValueError: bad flag values
        print(f"glimpse generate: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    config = engine_config_from_args(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    model_config = load_model_config(args.model_path)
    params.validate(model_config.text.vocab_size)
    if args.batch_size < 1:
        raise InvalidRequestError("--batch-size must be >= 1", "batch_size")
    device = resolve_device(config.load.device)
    dtype = resolve_dtype(config.load.dtype, device)
    has_media = bool(args.image or args.video)
    processor = MultimodalProcessor.from_pretrained(args.model_path)
    workers = None
    if config.parallel.tp > 1:
        # before loading: rank 0's layers take their shard of the group it joins here
        workers = start_workers(config.load, config.parallel, config.cache.block_size)
    try:
        # the vision tower is replicated, so rank 0 alone encodes the media
        model = load_model(
            args.model_path,
            dtype,
            device,
            config.load.load_format,
            vision=has_media,
            text=True,
            seed=config.load.seed,
            quantization=config.load.quantization,
        )
        thinking = None if args.enable_thinking is None else args.enable_thinking == "on"
        prepared = prepare_prompt(
            processor, model.visual, args.prompt, args.image, args.video, enable_thinking=thinking
        )
        model.visual = None  # the tower's work is done; free its memory before sizing the KV pool
        if device.type == "cuda":
            torch.cuda.empty_cache()
        engine = LLMEngine(
            model, model_config, config, tokenizer=processor.tokenizer, workers=workers
        )
        for i in range(args.batch_size):
            # with a seed, every copy draws its own (reproducible) sample
            p = params if params.seed is None else replace(params, seed=params.seed + i)
            engine.add_request(
                str(i),
                prepared.prompt_token_ids,
                p,
                prepared.mm_items,
                prepared.positions,
                prepared.rope_delta,
            )
        start = time.perf_counter()
        done = engine.run_to_completion()
        elapsed = time.perf_counter() - start
    finally:
        if workers is not None:
            workers.close()
    first = done["0"]
    generated = sum(len(r.token_ids) for r in done.values())
    if args.output_format == "json":
        print(
            json.dumps(
                {
                    "text": first.text,
                    "token_ids": first.token_ids,
                    "prompt_token_ids": first.prompt_token_ids,
                    "finish_reason": first.finish_reason,
                    "batch_size": args.batch_size,
                    "generated_tokens": generated,
                    "elapsed_s": round(elapsed, 4),
                    "tokens_per_s": round(generated / elapsed, 2) if elapsed > 0 else None,
                },
                ensure_ascii=False,
            )
        )
    else:
        print(first.text)
    return 0
