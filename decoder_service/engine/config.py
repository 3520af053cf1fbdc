"""Frozen engine configuration, composed of small parts; the CLI takes its defaults from here.

Contract: ``EngineConfig`` = ``LoadConfig`` (what to load and where) + ``CacheConfig`` (KV pool)
+ ``SchedulerConfig`` (per-step budgets) + ``MediaLimits`` (items per prompt) + ``ParallelConfig``
(tensor/expert-parallel ranks) + ``ExecutionConfig`` (CUDA graphs, decode attention kernel,
overlapping outputs with the next step). Values here are plain data; ``None`` means "derive at
start-up" (``max_model_len`` from the checkpoint, the number of KV blocks from free GPU memory).
Flag parsing lives in ``cli_args.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATION_MODES = ("auto", "fp8", "none")  # the set models/glm4v/loader.py accepts


@dataclass(frozen=True)
class LoadConfig:
    model_path: str = ""
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto = cuda when available, else cpu
    load_format: str = "auto"  # "auto" (safetensors) or "dummy" (random weights)
    # FP8 compute: "auto" follows the checkpoint's quantization_config (CUDA sm_89+ only),
    # "fp8" forces it (also for bf16 or dummy weights), "none" dequantises FP8 checkpoints
    quantization: str = "auto"
    seed: int = 0  # seeds dummy weights and unseeded sampling


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # fixed pool size; None = size from memory (CPU: 1024 blocks)
    mem_fraction_static: float = 0.85  # GPU: share of free memory (after weights, peak) for KV
    enable_prefix_caching: bool = True
    # GPU: memory the sized KV pool leaves for tensors that live between steps (the decoder
    # service's device budget for fetched vision features), MiB
    reserved_gpu_mb: int = 0


CPU_DEFAULT_NUM_BLOCKS = 1024


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 8192  # tokens computed per step, all requests together
    chunked_prefill_size: int | None = None  # prefill tokens per request per step; None = budget
    max_running_requests: int = 256  # requests holding KV blocks at once
    max_model_len: int | None = None  # prompt + output tokens; None = the checkpoint's limit

    @property
    def prefill_chunk(self) -> int:
        return self.chunked_prefill_size or self.max_num_batched_tokens


@dataclass(frozen=True)
class MediaLimits:
    max_images: int = 16  # images per prompt
    max_videos: int = 2  # videos per prompt


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1  # tensor-parallel ranks (one process each; rank 0 runs the scheduler)
    ep: int = 1  # expert-parallel size of the routed experts: 1 (sliced by TP) or equal to tp
    # seconds a collective may wait for a peer before failing (a dead peer is noticed sooner)
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tensor-parallel size must be >= 1, got {self.tp}")
        if self.ep not in (1, self.tp):
            raise ValueError(
                f"expert-parallel size must be 1 or equal to tp ({self.tp}), got {self.ep}"
            )
        if self.timeout_s <= 0:
            raise ValueError(f"parallel timeout must be positive, got {self.timeout_s}")

    @property
    def expert_parallel(self) -> bool:
        return self.ep > 1


DECODE_ATTENTION = ("auto", "sdpa")


@dataclass(frozen=True)
class ExecutionConfig:
    # never capture CUDA graphs; graphs are used only on CUDA, for pure decode steps
    enforce_eager: bool = False
    # "auto" = the Triton split-K paged kernel on CUDA (SDPA elsewhere); "sdpa" = always SDPA
    # (CUDA graphs need the kernel, so "sdpa" also runs eagerly)
    decode_attention: str = "auto"
    # launch each next step before building this step's outputs (detokenising, stop strings), so
    # the device computes while the host finishes; a request added, given its media or aborted
    # while a step is in flight takes effect one step later (see ``LLMEngine.step``)
    overlap_outputs: bool = False

    def __post_init__(self) -> None:
        if self.decode_attention not in DECODE_ATTENTION:
            raise ValueError(f"decode attention must be one of {DECODE_ATTENTION}")


@dataclass(frozen=True)
class EngineConfig:
    load: LoadConfig = field(default_factory=LoadConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    media: MediaLimits = field(default_factory=MediaLimits)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
