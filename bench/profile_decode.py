"""Where a decode step's time goes: wall time, GPU-busy time and the kernels behind it.

``python -m bench.profile_decode [--layers 6] [--batch-sizes 1,32] [--steps 20]
[--quantization none|fp8] [--enforce-eager] [--prefill 8192] [--top 25]`` (CUDA; ``--device
cpu`` for a smoke run) loads the GLM-4.5V text
decoder at its real widths with ``--layers`` layers and random (``dummy``) weights through the
serving loader, runs ``--prompt-len`` token prompts to decode, then records ``--steps`` engine
steps under ``torch.profiler`` and prints, per batch size:

- wall ms per step (host clock around the steps, the device synchronised at both ends);
- GPU-busy ms per step: the summed device time of every kernel and copy, so wall - busy is the
  time the device sat idle waiting on the host;
- the ``--top`` kernels by device time per step, with their launches per step.

``--prefill N`` profiles prefill steps instead: each step is one new N-token prompt (the step
budget is N), timed first without the profiler (that wall time gives the TFLOP/s, at two FLOPs
per active parameter per token, attention's quadratic term left out), then profiled: the top
kernels and the top host ops by self CPU time.

A diagnosis aid for ``bench.decode_bench``: nothing is asserted and no floor is computed here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.scaled_checkpoint import write_scaled_checkpoint
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

WARMUP_STEPS = 5


def kernel_table(prof, steps: int, top: int) -> tuple[float, float, list[tuple[str, float, float]]]:
    """(busy ms per step, kernels per step, [(kernel, us per step, launches per step)]) from
    device events."""
    totals: dict[str, list[float]] = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        slot = totals.setdefault(evt.name, [0.0, 0])
        slot[0] += evt.device_time
        slot[1] += 1
    busy = sum(v[0] for v in totals.values()) / steps / 1e3
    launches = sum(v[1] for v in totals.values()) / steps
    rows = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    return busy, launches, [(name, t / steps, n / steps) for name, (t, n) in rows]


def active_params(cfg) -> float:
    """Weights one token passes through in the text decoder (embedding table excluded)."""
    t = cfg.text
    attn = t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * t.head_dim
    attn += t.num_attention_heads * t.head_dim * t.hidden_size
    dense = 3 * t.hidden_size * t.intermediate_size
    moe = 3 * t.hidden_size * t.moe_intermediate_size * (t.num_experts_per_tok + t.n_shared_experts)
    moe += t.hidden_size * t.n_routed_experts  # router
    layers = sum(dense if not t.is_moe_layer(i) else moe for i in range(t.num_hidden_layers))
    return t.num_hidden_layers * attn + layers


def profile_prefill(engine, cfg, tokens: int, steps: int, top: int, device) -> None:
    gen = torch.Generator().manual_seed(tokens)
    vocab = cfg.text.vocab_size
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(n: int, tag: str) -> None:
        for i in range(n):
            prompt = torch.randint(100, vocab // 2, (tokens,), generator=gen).tolist()
            engine.add_request(f"{tag}-{i}", prompt, params)
        while engine.has_unfinished_requests:
            engine.step()

    run(2, "warm")
    sync()
    start = time.perf_counter()
    run(steps, "t")
    sync()
    plain = (time.perf_counter() - start) / steps * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run(steps, "p")
        sync()
        wall = (time.perf_counter() - start) / steps * 1e3
    chunked = (
        " (chunked: a prompt spans steps)"
        if engine.config.scheduler.max_num_batched_tokens < tokens
        else ""
    )
    busy, launches, rows = kernel_table(prof, steps, top)
    tflops = 2 * active_params(cfg) * tokens / (plain / 1e3) / 1e12
    print(
        f"\n== prefill {tokens} tokens{chunked}: wall {plain:.1f} ms/prompt ({wall:.1f} profiled), "
        f"GPU busy {busy:.1f} ms, {launches:.0f} kernels/prompt, {tflops:.0f} TFLOP/s (linear "
        "layers)"
    )
    print(f"{'us/prompt':>9} {'n/prompt':>8}  kernel")
    for name, us, n in rows:
        print(f"{us:>9.1f} {n:>8.1f}  {name[:110]}")
    host = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    print(f"{'host us/prompt':>14} {'n':>6}  op (self CPU time, the profiler's own included)")
    for e in host[:top]:
        print(f"{e.self_cpu_time_total / steps:>14.1f} {e.count / steps:>6.1f}  {e.key[:100]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--quantization", choices=("none", "fp8"), default="none")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--prefill", type=int, default=0, help="prompt tokens of one prefill step")
    p.add_argument(
        "--budget", type=int, default=0, help="--prefill: tokens a step (default: the prompt)"
    )
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    device = torch.device(a.device)
    sizes = [int(s) for s in a.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_scaled_checkpoint(Path(tmp) / "ckpt", a.layers, vision_depth=1)
        cfg = load_model_config(ckpt)
        model = load_model(
            ckpt,
            dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
            device=device,
            load_format="dummy",
            vision=False,
            quantization=a.quantization,
        )
    max_len = max(a.prompt_len + WARMUP_STEPS + a.steps, a.prefill) + 8
    config = EngineConfig(
        cache=CacheConfig(num_blocks=max(sizes) * (max_len // 16 + 2), enable_prefix_caching=False),
        scheduler=SchedulerConfig(
            # --prefill: one prompt a step, or --budget tokens (prompts then span steps)
            max_num_batched_tokens=a.budget or a.prefill or max(8192, max_len),
            max_running_requests=max(sizes),
            max_model_len=max_len,
        ),
        execution=ExecutionConfig(enforce_eager=a.enforce_eager),
    )
    engine = LLMEngine(model, cfg, config, tokenizer=None)
    print(f"{a.layers} layers, {a.quantization}, graphs {engine.uses_cuda_graphs}")
    vocab = cfg.text.vocab_size
    if a.prefill:
        profile_prefill(engine, cfg, a.prefill, a.steps, a.top, device)
        return 0
    for batch in sizes:
        gen = torch.Generator().manual_seed(batch)
        params = SamplingParams(
            max_tokens=WARMUP_STEPS + a.steps + 4, temperature=0.0, ignore_eos=True
        )
        for i in range(batch):
            prompt = torch.randint(100, vocab // 2, (a.prompt_len,), generator=gen).tolist()
            engine.add_request(f"b{batch}-{i}", prompt, params)
        while engine.scheduler.waiting or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
        ):
            engine.step()
        for _ in range(WARMUP_STEPS):
            engine.step()
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(a.steps):
                engine.step()
            sync()
            wall = (time.perf_counter() - start) / a.steps * 1e3
        busy, launches, rows = kernel_table(prof, a.steps, a.top)
        for rid in list(engine.scheduler.requests):
            engine.abort_request(rid)
        engine.step()
        print(
            f"\n== batch {batch}: wall {wall:.3f} ms/step (profiled), GPU busy {busy:.3f} ms, "
            f"{launches:.0f} kernels/step"
        )
        print(f"{'us/step':>9} {'n/step':>7}  kernel")
        for name, us, n in rows:
            print(f"{us:>9.1f} {n:>7.1f}  {name[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
