"""``glimpse generate``: offline generation from a prompt, images and videos, in one process.

Contract: loads the checkpoint (vision tower only when media are given), renders ``--prompt`` with
the checkpoint's chat template as a single user turn, encodes ``--image`` / ``--video`` files
with the model's own tower (``mm_local.py``), runs ``LLMEngine`` to completion and prints the
text, or with ``--output-format json`` one JSON object with ``text``, ``token_ids``,
``prompt_token_ids``, ``finish_reason`` and timing. ``--batch-size N`` submits the prompt N
times at once (throughput check; the first request is printed). ``--requests FILE`` is offline
batch inference instead: a JSON-lines file of ``{"prompt", "images", "videos", "id"}`` objects,
all submitted to one engine at once, answered as one JSON line each in the file's order (with
``--output-format json``) or one text line each. Bad input (unreadable media,
invalid sampling values, a prompt that does not fit) exits with status 2 and a message on
stderr. Engine flags come from ``engine/cli_args.py``; with ``--tp N`` this process is rank 0 and
spawns the other ranks for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

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
    g.add_argument("--prompt", default=None, help="user message text")
    g.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    g.add_argument("--video", action="append", default=[], help="video file (repeatable)")
    g.add_argument(
        "--requests",
        type=Path,
        default=None,
        help='JSON lines of {"prompt": ..., "images": [...], "videos": [...], "id": ...}: '
        "many requests in one batched run (instead of --prompt/--image/--video)",
    )
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


@dataclass(frozen=True)
class OfflineRequest:
    id: str
    prompt: str
    images: list[str] = field(default_factory=list)
    videos: list[str] = field(default_factory=list)


def read_requests(args: argparse.Namespace) -> list[OfflineRequest]:
    """The run's requests: the --prompt flags, or every line of --requests."""
    if args.requests is None:
        if args.prompt is None:
            raise InvalidRequestError(
                "give --prompt (with --image/--video) or --requests", "prompt"
            )
        return [OfflineRequest("0", args.prompt, list(args.image), list(args.video))]
    if args.prompt is not None or args.image or args.video:
        raise InvalidRequestError("--requests replaces --prompt, --image and --video", "requests")
    if args.batch_size != 1:
        raise InvalidRequestError("--batch-size applies to --prompt only", "batch_size")
    requests, seen = [], set()
    for n, line in enumerate(args.requests.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{args.requests}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{where}: not JSON ({exc.msg})", "requests") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise InvalidRequestError(
                f'{where}: needs an object with a string "prompt"', "requests"
            )
        unknown = set(obj) - {"id", "prompt", "images", "videos"}
        if unknown:
            raise InvalidRequestError(f"{where}: unknown keys {sorted(unknown)}", "requests")
        media = {}
        for key in ("images", "videos"):
            value = obj.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidRequestError(f'{where}: "{key}" must be a list of paths', "requests")
            media[key] = value
        rid = str(obj.get("id", len(requests)))
        if rid in seen:
            raise InvalidRequestError(f"{where}: duplicate id {rid!r}", "requests")
        seen.add(rid)
        requests.append(OfflineRequest(rid, obj["prompt"], media["images"], media["videos"]))
    if not requests:
        raise InvalidRequestError(f"{args.requests}: no requests", "requests")
    return requests


@contextlib.contextmanager
def _naming(request: OfflineRequest, total: int) -> Iterator[None]:
    """In a batch of several, a request's error says which request it was."""
    try:
        yield
    except (GlimpseModelError, ValueError, OSError) as exc:
        if total == 1:
            raise
        raise InvalidRequestError(f"request {request.id!r}: {exc}", "requests") from exc


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
    requests = read_requests(args)
    device = resolve_device(config.load.device)
    dtype = resolve_dtype(config.load.dtype, device)
    has_media = any(r.images or r.videos for r in requests)
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
        prepared = {}
        for r in requests:
            with _naming(r, len(requests)):
                prepared[r.id] = prepare_prompt(
                    processor, model.visual, r.prompt, r.images, r.videos, enable_thinking=thinking
                )
        model.visual = None  # the tower's work is done; free its memory before sizing the KV pool
        if device.type == "cuda":
            torch.cuda.empty_cache()
        engine = LLMEngine(
            model, model_config, config, tokenizer=processor.tokenizer, workers=workers
        )
        if args.requests is None:  # --batch-size copies of the one prompt
            submissions = [(str(i), requests[0], i) for i in range(args.batch_size)]
        else:
            submissions = [(r.id, r, 0) for r in requests]
        for engine_id, r, i in submissions:
            # with a seed, every copy of one prompt draws its own (reproducible) sample
            p = params if params.seed is None else replace(params, seed=params.seed + i)
            inp = prepared[r.id]
            with _naming(r, len(requests)):
                engine.add_request(
                    engine_id, inp.prompt_token_ids, p, inp.mm_items, inp.positions, inp.rope_delta
                )
        start = time.perf_counter()
        done = engine.run_to_completion()
        elapsed = time.perf_counter() - start
    finally:
        if workers is not None:
            workers.close()
    if args.requests is not None:
        for r in requests:
            out = done[r.id]
            if args.output_format == "json":
                line = {
                    "id": r.id,
                    "text": out.text,
                    "token_ids": out.token_ids,
                    "prompt_token_ids": out.prompt_token_ids,
                    "finish_reason": out.finish_reason,
                }
                print(json.dumps(line, ensure_ascii=False))
            else:
                print(out.text.replace("\n", " "))
        return 0
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
