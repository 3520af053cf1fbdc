"""Offline decode benchmark against the HBM floor: Glimpse's engine and transformers, one weight set.

``python -m bench.decode_bench [--layers 6] [--batch-sizes 1,32] [--steps 64] [--prompt-len 512]
[--repeats 3] [--skip-hf] [--json PATH] [--tiny] [--device cuda|cpu]``

Model: the GLM-4.5V text decoder at its real widths (``TextConfig`` defaults: hidden 4096, 96/8
heads of 128, 128 routed experts top-8 of width 1408, one shared expert, layer 0 dense, vocab
151552) but ``--layers`` layers, bf16 on CUDA (float32 on CPU). ``--tiny`` takes the tiny
checkpoint's widths instead, for a CPU smoke run. transformers' ``Glm4vMoeForConditionalGeneration``
is built from the config straight on the device and given seeded random weights (matrices
N(0, 0.02), norms 1, biases 0); Glimpse's model is then filled from it through ``load_weights``
(checkpoint names via ``models/glm4v/hf_names.py``), so both run the same weights. If free GPU
memory cannot hold both models, transformers' is moved to host memory for the copy.

Method, per row (a decode step makes one token per sequence: ms/step is the per-token latency):
- glimpse: ``LLMEngine`` with decode CUDA graphs (default) and with ``--enforce-eager``; prompts
  of ``--prompt-len`` random non-special tokens, greedy, ``ignore_eos``; after the prefill and 5
  warm-up steps, ``--repeats`` rounds of ``--steps`` steps; the best round counts.
- transformers: ``generate`` (greedy, no EOS) after a short warm-up generate; a logits processor
  synchronises the device and stamps the time at every generated token, so the prefill is left
  out: ms/step = (last stamp - first stamp) / (stamps - 1).
- floor: bytes a step must read (``step_bytes``: the non-expert weights of the text layers, the
  routed experts actually used, lm_head and final norm, the gathered embedding rows, the KV cache
  of the mean context) / the measured device copy bandwidth (best of several copies of
  ``--copy-mib``, read + write bytes). Experts read per MoE layer: top-k at batch 1; at larger
  batches the mean number of distinct experts the router chose during the eager engine's warm-up
  steps (the expected count under uniform routing when not measured).
- ratio = measured / floor ms (P1: <= 1.3 at batch 1); bw = floor bytes / measured time as a share
  of the copy bandwidth (P2: >= 0.75 at batch 32).
- a sanity line: how many leading greedy tokens of prompt 0 Glimpse and transformers share (equal
  in float32; bf16 rounding may split near-ties later).
Not a test: nothing is asserted. Not here: serving-level latency (``glimpse bench serve``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import time
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
from models.glm4v import tiny
from models.glm4v.config import ModelConfig, TextConfig, VisionConfig
from models.glm4v.hf_names import checkpoint_tensors
from models.glm4v.loader import build_model
from models.glm4v.model import Glm4vMoeForCausalLM
from models.layers.moe import TopKRouter

WARMUP_STEPS = 5
# requests whose prompt is done decode while later prompts are still prefilling in chunks
PREFILL_SLACK = 16
INIT_STD = 0.02
TINY_VOCAB = 512
GIB = 1 << 30
LOAD_MARGIN = 2 * GIB  # free memory kept beyond the second model's weights while copying

# ---- floor arithmetic (pure) -------------------------------------------------------------------


class StepBytes(NamedTuple):
    layers: float  # non-expert weights of the text layers: attention, norms, dense MLP, routers,
    # shared experts
    experts: float  # routed expert weights read
    head: float  # lm_head + final norm + the gathered embedding rows
    kv: float  # KV cache of the context

    @property
    def total(self) -> float:
        return self.layers + self.experts + self.head + self.kv


def expected_experts(num_experts: int, top_k: int, batch: int) -> float:
    """Mean distinct experts hit by ``batch`` tokens routed uniformly at random, top_k each."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def step_bytes(
    tc: TextConfig,
    batch: int,
    context: float,  # mean tokens in each sequence's KV cache during the step
    experts_read: float,  # distinct routed experts read per MoE layer
    weight_bytes: int,  # bytes per weight / KV element (2 for bf16)
) -> StepBytes:
    h, d = tc.hidden_size, tc.head_dim
    qkv_out = (tc.num_attention_heads + 2 * tc.num_key_value_heads) * d
    attn = qkv_out * h + tc.num_attention_heads * d * h + (qkv_out if tc.attention_bias else 0)
    norms = 2 * h
    moe = [tc.is_moe_layer(i) for i in range(tc.num_hidden_layers)]
    n_moe = sum(moe)
    n_dense = tc.num_hidden_layers - n_moe
    router = tc.n_routed_experts * h
    shared = 3 * h * tc.moe_intermediate_size * tc.n_shared_experts
    layers = (
        tc.num_hidden_layers * (attn + norms)
        + n_dense * 3 * h * tc.intermediate_size
        + n_moe * shared
    ) * weight_bytes + n_moe * (router + tc.n_routed_experts) * 4  # float32 gate and bias
    experts = n_moe * experts_read * 3 * h * tc.moe_intermediate_size * weight_bytes
    head = (tc.vocab_size * h + h + batch * h) * weight_bytes
    kv = batch * context * tc.num_hidden_layers * 2 * tc.num_key_value_heads * d * weight_bytes
    return StepBytes(float(layers), float(experts), float(head), float(kv))


# ---- model configuration and weights --------------------------------------------------------


def bench_model_config(layers: int, tiny_dims: bool) -> ModelConfig:
    if not tiny_dims:
        return ModelConfig(text=TextConfig(num_hidden_layers=layers), vision=VisionConfig(depth=1))
    text_fields = {f.name for f in dataclasses.fields(TextConfig)}
    dims = {k: v for k, v in tiny.TEXT_DIMS.items() if k in text_fields}
    top = TINY_VOCAB - 16  # special tokens at the top of the vocabulary, away from prompts
    text = TextConfig(
        **dims | {"num_hidden_layers": layers, "vocab_size": TINY_VOCAB},
        mrope_section=tuple(tiny.MROPE_SECTION),
        eos_token_ids=(top, top + 1, top + 2),
        pad_token_id=top,
    )
    vision_fields = {f.name for f in dataclasses.fields(VisionConfig)}
    vision = VisionConfig(
        **{k: v for k, v in tiny.VISION_DIMS.items() if k in vision_fields} | {"depth": 1}
    )
    ids = dict(
        image_token_id=top + 3,
        video_token_id=top + 4,
        image_start_token_id=top + 5,
        image_end_token_id=top + 6,
        video_start_token_id=top + 7,
        video_end_token_id=top + 8,
    )
    return ModelConfig(text=text, vision=vision, **ids)


def hf_config_dict(cfg: ModelConfig) -> dict:
    """``config.json`` (GLM-4.5V layout) of ``cfg``; parsed back by ``ModelConfig.from_dict``."""
    text = dataclasses.asdict(cfg.text)
    rope = {"type": "default", "mrope_section": list(text.pop("mrope_section"))}
    eos = list(text.pop("eos_token_ids"))
    text |= {"model_type": "glm4v_moe_text", "rope_scaling": rope, "eos_token_id": eos}
    text |= {"hidden_act": "silu", "use_qk_norm": False, "initializer_range": INIT_STD}
    vision = {"model_type": "glm4v_moe_vision", **dataclasses.asdict(cfg.vision)}
    ids = {k: v for k, v in dataclasses.asdict(cfg).items() if k.endswith("_token_id")}
    return {
        "architectures": ["Glm4vMoeForConditionalGeneration"],
        "model_type": "glm4v_moe",
        "text_config": text,
        "vision_config": vision,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
        **ids,
    }


@torch.no_grad()
def build_hf_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int):
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    hf_cfg = Glm4vMoeConfig.from_dict(hf_config_dict(cfg))
    with torch.device(device):
        model = Glm4vMoeForConditionalGeneration._from_config(
            hf_cfg, dtype=dtype, attn_implementation="sdpa"
        )
    for i, (name, p) in enumerate(model.named_parameters()):
        if name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight")):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, INIT_STD, generator=torch.Generator(device).manual_seed(seed + i))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()
    model.generation_config.eos_token_id = None  # ignore EOS: every step makes a token
    model.generation_config.pad_token_id = cfg.text.pad_token_id
    return model.eval()


def glimpse_from_hf(hf, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
    """Glimpse's text model holding ``hf``'s weights (``hf`` may be moved to the host)."""
    with torch.device("meta"):
        need = sum(p.nbytes for p in Glm4vMoeForCausalLM(cfg, dtype, vision=False).parameters())
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info(device)[0]
        print(f"free GPU memory {free / GIB:.1f} GiB, Glimpse weights {need / GIB:.1f} GiB")
        if free < need + LOAD_MARGIN:
            print("not enough for both models: moving transformers' weights to host memory")
            hf.to("cpu")
            torch.cuda.empty_cache()
    model = build_model(cfg, dtype, device, vision=False, text=True)
    report = model.load_weights(checkpoint_tensors(hf.state_dict()))
    missing = set(model.checkpoint_names()) - report.loaded
    if missing or report.unexpected:
        raise RuntimeError(f"weight copy: missing {sorted(missing)[:3]}, {report.unexpected[:3]}")
    return model.requires_grad_(False).eval()


# ---- timing -------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Best device-to-device copy rate in GB/s, counting the bytes read and written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":  # events: a ~1 ms copy is too short for host timers
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) * 1e-3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        best = min(best, seconds)
    del src, dst
    return 2 * nbytes / best / 1e9


class EngineRun(NamedTuple):
    ms_per_step: float  # best round
    experts_read: float | None  # distinct experts per MoE layer per warm-up step (eager only)
    tokens: list[int]  # greedy tokens of the first request


def build_engine(model, cfg: ModelConfig, max_batch: int, max_len: int, graphs: bool):
    blocks = max_batch * (-(-max_len // 16) + 1)
    config = EngineConfig(
        cache=CacheConfig(num_blocks=blocks, enable_prefix_caching=False),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=max(8192, max_len),
            max_running_requests=max_batch,
            max_model_len=max_len,
        ),
        execution=ExecutionConfig(enforce_eager=not graphs),
    )
    engine = LLMEngine(model, cfg, config, tokenizer=None)
    if graphs and not engine.uses_cuda_graphs:
        raise RuntimeError("CUDA graphs were asked for but not captured (see the log)")
    return engine


def run_engine(engine: LLMEngine, prompts: torch.Tensor, steps: int, repeats: int) -> EngineRun:
    batch = prompts.shape[0]
    budget = WARMUP_STEPS + repeats * steps + 2 + PREFILL_SLACK
    params = SamplingParams(max_tokens=budget, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts.tolist()):
        engine.add_request(f"b{batch}-{i}", prompt, params)
    first, tokens = f"b{batch}-0", []

    def step() -> None:
        for out in engine.step():
            if out.request_id == first:
                tokens.extend(out.new_token_ids)

    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
    ):
        step()
    counts: list[int] = []

    def count(module, args, out) -> None:
        if out.ids.shape[0] == batch:
            counts.append(out.ids.unique().numel())

    hooks = [
        m.register_forward_hook(count)
        for m in engine.runner.model.modules()
        if isinstance(m, TopKRouter)
    ]
    for _ in range(WARMUP_STEPS):
        step()
    for h in hooks:
        h.remove()
    device = engine.runner.device
    rounds = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        rounds.append(time.perf_counter() - start)
    if len(engine.scheduler.running) != batch:
        raise RuntimeError("a request finished early; the batch shrank during timing")
    for rid in list(engine.scheduler.requests):
        engine.abort_request(rid)
    engine.step()
    experts = sum(counts) / len(counts) if counts else None
    return EngineRun(min(rounds) / steps * 1e3, experts, tokens)


def run_hf(hf, prompts: torch.Tensor, steps: int) -> tuple[float, list[int]]:
    """ms per decode step of ``generate`` (prefill excluded) and the first sequence's tokens."""
    from transformers import LogitsProcessor, LogitsProcessorList

    device = hf.device

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores):
            _sync(device)
            self.stamps.append(time.perf_counter())
            return scores

    ids = prompts.to(device)
    kwargs = {"attention_mask": torch.ones_like(ids), "do_sample": False}
    hf.generate(ids, max_new_tokens=3, **kwargs)
    clock = StepClock()
    out = hf.generate(
        ids, max_new_tokens=steps + 1, logits_processor=LogitsProcessorList([clock]), **kwargs
    )
    ms = (clock.stamps[-1] - clock.stamps[0]) / (len(clock.stamps) - 1) * 1e3
    return ms, out[0, ids.shape[1] :].tolist()


# ---- report -------------------------------------------------------------------------------------


class Row(NamedTuple):
    impl: str  # "glimpse graphs", "glimpse eager", "transformers"
    batch: int
    ms_per_step: float
    context: float  # mean KV context per sequence while timed
    experts_read: float  # per MoE layer, as counted in the floor
    floor_bytes: float  # bytes one step must read

    def summary(self, copy_gbs: float) -> dict:
        floor_ms = self.floor_bytes / (copy_gbs * 1e9) * 1e3
        achieved = self.floor_bytes / (self.ms_per_step * 1e-3) / 1e9
        out = self._asdict() | {
            "tok_s": self.batch * 1e3 / self.ms_per_step,
            "floor_ms": floor_ms,
            "ratio": self.ms_per_step / floor_ms,
            "achieved_gbs": achieved,
            "bw_fraction": achieved / copy_gbs,
            "target": "",
        }
        if self.impl.startswith("glimpse"):
            if self.batch == 1:
                out["target"] = "P1 " + ("met" if out["ratio"] <= 1.3 else "missed")
            elif self.batch == 32:
                out["target"] = "P2 " + ("met" if out["bw_fraction"] >= 0.75 else "missed")
        return out


def print_table(rows: list[dict]) -> None:
    print(
        f"{'impl':<15} {'batch':>5} {'ms/step':>8} {'tok/s':>8} {'floor ms':>9} {'ratio':>6} "
        f"{'GB/s':>7} {'bw':>5} {'experts':>7}  target"
    )
    for r in rows:
        print(
            f"{r['impl']:<15} {r['batch']:>5} {r['ms_per_step']:>8.2f} {r['tok_s']:>8.1f} "
            f"{r['floor_ms']:>9.3f} {r['ratio']:>6.2f} {r['achieved_gbs']:>7.0f} "
            f"{r['bw_fraction']:>5.2f} {r['experts_read']:>7.1f}  {r['target']}"
        )


def leading_agreement(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--skip-hf", action="store_true", help="time Glimpse only")
    p.add_argument("--json", default="", help="write the rows here")
    p.add_argument("--tiny", action="store_true", help="the tiny checkpoint's widths (smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--copy-mib", type=int, default=0, help="copy size (default 2048; tiny 16)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    sizes = [int(s) for s in a.batch_sizes.split(",")]
    cfg = bench_model_config(a.layers, a.tiny)
    tc = cfg.text
    copy_bytes = (a.copy_mib or (16 if a.tiny else 2048)) << 20
    copy_gbs = copy_bandwidth(device, copy_bytes)
    print(f"device {device}: copy bandwidth {copy_gbs:.0f} GB/s ({copy_bytes >> 20} MiB copies)")
    specials = [*tc.eos_token_ids, cfg.image_token_id, cfg.image_start_token_id]
    gen = torch.Generator().manual_seed(a.seed)
    prompts = torch.randint(0, min(specials), (max(sizes), a.prompt_len), generator=gen)
    elem = torch.empty(0, dtype=dtype).element_size()
    measured: dict[int, float] = {}  # batch -> experts read per layer, from the eager engine

    def experts(batch: int) -> float:
        if batch == 1:
            return float(tc.num_experts_per_tok)
        default = expected_experts(tc.n_routed_experts, tc.num_experts_per_tok, batch)
        return measured.get(batch, default)

    timings: list[tuple[str, int, float, float]] = []  # impl, batch, ms, context
    hf_tokens: list[int] = []
    hf = build_hf_model(cfg, dtype, device, a.seed)
    impl = (hf.config._attn_implementation, hf.config.text_config._experts_implementation)
    print(f"transformers: attention {impl[0]}, experts {impl[1]}")
    if not a.skip_hf:
        for b in sizes:
            ms, tokens = run_hf(hf, prompts[:b], a.steps)
            hf_tokens = hf_tokens or tokens
            timings.append(("transformers", b, ms, a.prompt_len + a.steps / 2))
            print(f"transformers batch {b}: {ms:.2f} ms/step")
    model = glimpse_from_hf(hf, cfg, dtype, device)
    del hf
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    max_len = a.prompt_len + WARMUP_STEPS + a.repeats * a.steps + 4 + PREFILL_SLACK
    context = a.prompt_len + WARMUP_STEPS + a.repeats * a.steps / 2
    ours_tokens: list[int] = []
    for graphs in [False, True] if device.type == "cuda" else [False]:
        name = "glimpse graphs" if graphs else "glimpse eager"
        engine = build_engine(model, cfg, max(sizes), max_len, graphs)
        for b in sizes:
            run = run_engine(engine, prompts[:b], a.steps, a.repeats)
            if run.experts_read is not None and b > 1:
                measured[b] = run.experts_read
            ours_tokens = ours_tokens or run.tokens
            timings.append((name, b, run.ms_per_step, context))
            print(f"{name} batch {b}: {run.ms_per_step:.2f} ms/step")
        del engine
        gc.collect()
    rows = []
    for impl, b, ms, ctx in timings:
        n = experts(b)
        row = Row(impl, b, ms, ctx, n, step_bytes(tc, b, ctx, n, elem).total)
        rows.append(row.summary(copy_gbs))
    rows.sort(key=lambda r: (r["impl"] == "transformers", r["impl"], r["batch"]))
    report = {"device": str(device), "dtype": str(dtype), "copy_gbs": copy_gbs, "rows": rows}
    if hf_tokens:
        n = min(len(hf_tokens), len(ours_tokens))
        agree = leading_agreement(hf_tokens, ours_tokens)
        report["greedy_agreement"] = [agree, n]
        print(f"greedy tokens of prompt 0: Glimpse and transformers agree on {agree} of first {n}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    print(
        f"{tc.num_hidden_layers} layers, {dtype}, prompt {a.prompt_len}, {a.steps} steps; "
        "floor = bytes / copy bandwidth; ratio = ms / floor ms; bw = share of copy bandwidth"
    )
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
