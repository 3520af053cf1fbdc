"""Engine flags shared by every command that runs an ``LLMEngine`` (``generate``, ``decoder``).

Contract: ``add_engine_arguments(parser)`` adds the flags with defaults read from the config
dataclasses; ``engine_config_from_args(args)`` builds the frozen ``EngineConfig`` back from them.
``parse_mm_limits`` accepts ``image=4,video=1`` or the JSON ``{"image": 4, "video": 1}``.
Resolving ``auto`` device/dtype against the machine is ``resolve_device`` / ``resolve_dtype``.
``--tp`` / ``--ep`` are checked when the config is built (``ValueError``: ep must be 1 or tp).
"""

from __future__ import annotations

import argparse
import json

import torch

from decoder_service.engine.config import (
    CPU_DEFAULT_NUM_BLOCKS,
    DECODE_ATTENTION,
    DTYPES,
    QUANTIZATION_MODES,
    CacheConfig,
    EngineConfig,
    ExecutionConfig,
    LoadConfig,
    MediaLimits,
    ParallelConfig,
    SchedulerConfig,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    load, cache, sched, media = LoadConfig(), CacheConfig(), SchedulerConfig(), MediaLimits()
    par = ParallelConfig()
    g = parser.add_argument_group("model")
    g.add_argument("--model-path", required=True, help="checkpoint directory (HF format)")
    g.add_argument("--dtype", choices=DTYPES, default=load.dtype, help="weights and activations")
    g.add_argument("--device", default=load.device, help="cuda, cuda:N, cpu or auto")
    g.add_argument(
        "--load-format",
        choices=("auto", "safetensors", "dummy"),
        default=load.load_format,
        help="dummy = random weights (benchmarks without a download)",
    )
    g.add_argument(
        "--quantization",
        choices=QUANTIZATION_MODES,
        default=load.quantization,
        help="auto = FP8 weights and GEMMs when the checkpoint is FP8 and the GPU is sm_89+; "
        "fp8 = force them (bf16 or dummy weights are quantised per channel); "
        "none = dequantise FP8 checkpoints to --dtype",
    )
    g = parser.add_argument_group("KV cache and scheduling")
    g.add_argument("--block-size", type=int, default=cache.block_size, help="tokens per KV block")
    g.add_argument(
        "--num-blocks",
        type=int,
        default=cache.num_blocks,
        help=f"fixed KV pool size in blocks (CPU default {CPU_DEFAULT_NUM_BLOCKS}; GPU: from memory)",
    )
    g.add_argument(
        "--mem-fraction-static",
        "--gpu-memory-utilization",
        type=float,
        default=cache.mem_fraction_static,
        help="GPU: share of the memory left after weights and activations that the KV pool takes",
    )
    g.add_argument("--disable-prefix-caching", action="store_true")
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=sched.max_num_batched_tokens,
        help="tokens computed per step across all requests",
    )
    g.add_argument(
        "--chunked-prefill-size",
        type=int,
        default=sched.chunked_prefill_size,
        help="prefill tokens per request per step (default: the step budget)",
    )
    g.add_argument("--max-running-requests", type=int, default=sched.max_running_requests)
    g.add_argument(
        "--max-model-len",
        type=int,
        default=sched.max_model_len,
        help="prompt + output tokens (default: the checkpoint's max_position_embeddings)",
    )
    g.add_argument(
        "--limit-mm-per-prompt",
        type=parse_mm_limits,
        default=media,
        help=f"e.g. image={media.max_images},video={media.max_videos}",
    )
    g = parser.add_argument_group("parallelism")
    g.add_argument(
        "--tp",
        "--tensor-parallel-size",
        type=int,
        default=par.tp,
        help="tensor-parallel ranks, one process (and GPU) each; rank r uses cuda:r",
    )
    g.add_argument(
        "--ep",
        "--expert-parallel-size",
        type=int,
        default=par.ep,
        help="routed experts split whole across this many ranks: 1 (sliced by TP) or --tp",
    )
    g.add_argument(
        "--expert-parallel",
        action="store_true",
        help="shorthand for --ep equal to --tp",
    )
    ex = ExecutionConfig()
    g = parser.add_argument_group("execution")
    g.add_argument(
        "--enforce-eager",
        action="store_true",
        default=ex.enforce_eager,
        help="never capture CUDA graphs (by default decode steps replay graphs on CUDA)",
    )
    g.add_argument(
        "--decode-attention",
        choices=DECODE_ATTENTION,
        default=ex.decode_attention,
        help="auto = Triton split-K paged kernel on CUDA; sdpa = torch SDPA (no CUDA graphs)",
    )
    g.add_argument(
        "--overlap-outputs",
        action="store_true",
        default=ex.overlap_outputs,
        help="launch the next step before detokenising this one (requests added meanwhile join "
        "a step later)",
    )


def parse_mm_limits(text: str) -> MediaLimits:
    try:
        raw = (
            json.loads(text)
            if text.strip().startswith("{")
            else dict(kv.split("=", 1) for kv in text.split(",") if kv.strip())
        )
        counts = {k.strip(): int(v) for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise argparse.ArgumentTypeError(f"bad --limit-mm-per-prompt {text!r}: {exc}") from exc
    unknown = set(counts) - {"image", "video"}
    if unknown or any(v < 0 for v in counts.values()):
        raise argparse.ArgumentTypeError(f"bad --limit-mm-per-prompt {text!r}")
    d = MediaLimits()
    return MediaLimits(counts.get("image", d.max_images), counts.get("video", d.max_videos))


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        load=LoadConfig(
            model_path=args.model_path,
            dtype=args.dtype,
            device=args.device,
            load_format=args.load_format,
            quantization=args.quantization,
        ),
        cache=CacheConfig(
            block_size=args.block_size,
            num_blocks=args.num_blocks,
            mem_fraction_static=args.mem_fraction_static,
            enable_prefix_caching=not args.disable_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            chunked_prefill_size=args.chunked_prefill_size,
            max_running_requests=args.max_running_requests,
            max_model_len=args.max_model_len,
        ),
        media=args.limit_mm_per_prompt,
        parallel=ParallelConfig(tp=args.tp, ep=args.tp if args.expert_parallel else args.ep),
        execution=ExecutionConfig(
            enforce_eager=args.enforce_eager,
            decode_attention=args.decode_attention,
            overlap_outputs=args.overlap_outputs,
        ),
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]
