"""Engine step benchmark: decode milliseconds per step of ``LLMEngine`` on the tiny checkpoint.

``python -m bench.engine_step_bench [--device cpu|cuda] [--batch-sizes 1,32] [--steps 50]
[--repeats 3] [--threads 1] [--graphs both|on|off] [--profile]``

The tiny checkpoint's compute is negligible, so what this measures is the engine's per-step
host work: scheduling, building the flat batch (ids, M-RoPE positions, slots, block tables),
launching the model's ops, sampling, detokenizing. For each batch size it admits that many
requests (prompts of ``--prompt-len`` random tokens with 3-D positions and a non-zero
``rope_delta``, like an image prompt's text tail; greedy, ``ignore_eos``), runs the prefill and
a few warm-up decode steps, then times ``--repeats`` rounds of ``--steps`` decode steps. Each
row prints the best and the median round's ms/step, output tokens/s of the best round, and the
share of the time spent in ``ModelRunner.prepare_inputs``; the best round is the least disturbed
by other work on a shared machine. On CUDA each batch size runs twice, with decode CUDA graphs
and with ``--enforce-eager`` (``--graphs on|off`` keeps one); a decode step makes one token per
request, so ms/step is the decode latency per token. ``--profile`` adds a cProfile listing.
Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from decoder_service.engine.config import (
    CacheConfig,
    EngineConfig,
    ExecutionConfig,
    SchedulerConfig,
)
from decoder_service.engine.engine import LLMEngine
from decoder_service.engine.sampling_params import SamplingParams
from models.glm4v.config import load_model_config
from models.glm4v.loader import load_model
from models.glm4v.tiny import write_tiny_checkpoint

WARMUP_STEPS = 5


class _Timer:
    """Wraps a bound method and adds up the seconds spent in it."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def build_engine(
    ckpt: Path, device: torch.device, max_batch: int, max_len: int, graphs: bool = False
) -> LLMEngine:
    from tokenizers import Tokenizer

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(ckpt, dtype=dtype, device=device, vision=False)
    config = EngineConfig(
        cache=CacheConfig(num_blocks=max_batch * (max_len // 16 + 1)),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=max(2048, max_batch * max_len),
            max_running_requests=max_batch,
            max_model_len=max_len,
        ),
        execution=ExecutionConfig(enforce_eager=not graphs),
    )
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    engine = LLMEngine(model, load_model_config(ckpt), config, tok)
    if graphs and not engine.uses_cuda_graphs:
        raise RuntimeError("CUDA graphs were asked for but not captured (see the log)")
    return engine


class DecodeTiming(NamedTuple):
    best_ms: float  # ms per step of the fastest round
    median_ms: float  # ms per step of the median round
    prepare_share: float  # fraction of the timed steps spent in prepare_inputs


def time_decode(engine: LLMEngine, batch: int, args: argparse.Namespace) -> DecodeTiming:
    """Decode steps of ``batch`` running requests, timed in rounds."""
    vocab = engine.model_config.text.vocab_size
    gen = torch.Generator().manual_seed(batch)
    budget = WARMUP_STEPS + args.repeats * args.steps + 2
    params = SamplingParams(max_tokens=budget, temperature=0.0, ignore_eos=True)
    delta = 7  # decode positions n + rope_delta, as after an image
    for i in range(batch):
        prompt = torch.randint(100, vocab - 100, (args.prompt_len,), generator=gen).tolist()
        positions = torch.arange(args.prompt_len).expand(3, -1).clone()
        engine.add_request(f"b{batch}-{i}", prompt, params, (), positions, delta)
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
    ):
        engine.step()
    for _ in range(WARMUP_STEPS):
        engine.step()
    runner = engine.runner
    timer = _Timer(runner.prepare_inputs)
    runner.prepare_inputs = timer  # an instance attribute shadows the method while timing
    prof = cProfile.Profile() if args.profile else None
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    rounds = []
    for _ in range(args.repeats):
        sync()
        start = time.perf_counter()
        if prof is not None:
            prof.enable()
        for _ in range(args.steps):
            engine.step()
        sync()
        if prof is not None:
            prof.disable()
        rounds.append(time.perf_counter() - start)
    del runner.prepare_inputs
    if len(engine.scheduler.running) != batch:
        raise RuntimeError("a request finished early; the batch shrank during timing")
    for rid in list(engine.scheduler.requests):
        engine.abort_request(rid)
    engine.step()
    if prof is not None:
        print(f"--- cProfile, batch {batch}, {args.repeats} x {args.steps} steps ---")
        for sort in ("tottime", "cumtime"):
            pstats.Stats(prof).sort_stats(sort).print_stats(25)
    per_step = sorted(r / args.steps * 1e3 for r in rounds)
    return DecodeTiming(per_step[0], statistics.median(per_step), timer.seconds / sum(rounds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--graphs", choices=("both", "on", "off"), default="both")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    modes = (
        [False]
        if device.type != "cuda"
        else {"both": [True, False], "on": [True]}.get(args.graphs, [False])
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0, variant="glm4.5v")
        max_len = args.prompt_len + WARMUP_STEPS + args.repeats * args.steps + 2
        for graphs in modes:
            engine = build_engine(ckpt, device, max(sizes), max_len, graphs)
            rows += [(b, graphs, time_decode(engine, b, args)) for b in sizes]
    print(
        f"device={device} threads={args.threads} dtype={engine.runner.dtype} "
        f"rounds={args.repeats}x{args.steps} steps prompt={args.prompt_len} tokens"
    )
    head = f"{'batch':>5} {'graphs':>6} {'best ms/step':>13} {'median':>8} {'tok/s':>9}"
    print(f"{head} {'prepare_inputs':>15}")
    for b, graphs, t in rows:
        tps = b * 1e3 / t.best_ms
        mode = "on" if graphs else "off"
        print(
            f"{b:>5} {mode:>6} {t.best_ms:>13.2f} {t.median_ms:>8.2f} {tps:>9.1f} "
            f"{t.prepare_share:>14.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
