"""FP8 compute on a GPU with FP8 tensor cores (sm_89+): row-wise scaled GEMMs against bf16 GEMMs
on the dequantised weights, a tiny FP8 checkpoint against its bf16 original, and FP8 dummy
weights at real GLM-4.5V widths."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kernels.moe_grouped_gemm import scaled_fused_supported
from models.glm4v.config import load_model_config
from models.glm4v.loader import load_model
from models.glm4v.model import Glm4vMoeForCausalLM
from models.layers.attention import AttentionMetadata
from models.layers.fp8 import dequantize, fp8_linear, quantize_per_channel, scaled_mm_supported
from models.layers.moe import RouterOutput, experts_grouped, experts_reference

pytestmark = pytest.mark.gpu
FP8 = torch.float8_e4m3fn


@pytest.fixture(autouse=True)
def _needs_fp8_gpu() -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA GPU with compute capability >= 8.9")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.mark.parametrize("tokens", [1, 7, 256])
def test_fp8_linear_matches_bf16_on_dequantised_weights(tokens: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, 4096, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(1536, 4096, device="cuda", generator=gen) * 0.02).bfloat16()
    bias = torch.randn(1536, device="cuda", generator=gen).bfloat16() * 0.1
    q, scale = quantize_per_channel(w)
    assert scaled_mm_supported(x, q), "torch._scaled_mm with row-wise scales is not used"
    got = fp8_linear(x, q, scale, bias)
    want = F.linear(x, dequantize(q, scale, torch.bfloat16), bias)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, 1536)
    # activations quantised per token: e4m3 rounding, a few percent at most
    assert _rel(got, want) < 0.04


def test_fp8_grouped_experts_match_bf16_on_dequantised_weights() -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    t, e, k, hidden, inter = 96, 16, 4, 1024, 352
    x = torch.randn(t, hidden, device="cuda", generator=gen).bfloat16()
    w13 = (torch.randn(e, 2 * inter, hidden, device="cuda", generator=gen) * 0.02).bfloat16()
    w2 = (torch.randn(e, hidden, inter, device="cuda", generator=gen) * 0.02).bfloat16()
    q13, s13 = quantize_per_channel(w13)
    q2, s2 = quantize_per_channel(w2)
    scores = torch.rand(t, e, device="cuda", generator=gen)
    weights, ids = scores.topk(k, dim=-1)
    route = RouterOutput(weights / weights.sum(-1, keepdim=True), ids)
    kw = {"foreign_slots": False, "w13_scale": s13, "w2_scale": s2}
    want = experts_reference(
        x, dequantize(q13, s13, torch.bfloat16), dequantize(q2, s2, torch.bfloat16), route
    )
    # the default CUDA path: the fused Triton kernels reading the FP8 codes
    assert _rel(experts_grouped(x, q13, q2, route, **kw), want) < 0.01
    # the grouped path: torch._scaled_grouped_mm where this build runs it correctly (quantised
    # activations: looser), and the per-expert dequantise + bf16 fallback
    if scaled_fused_supported(x, q13):
        assert _rel(experts_grouped(x, q13, q2, route, use_triton=False, **kw), want) < 0.05
    fallback = experts_grouped(x, q13, q2, route, use_triton=False, use_fused=False, **kw)
    assert _rel(fallback, want) < 0.01


def _fp8_checkpoint(src: Path, dst: Path) -> None:
    """The tiny checkpoint with every text-decoder projection quantised per output channel."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            (dst / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "ignore": ["lm_head", "re:.*visual.*", "re:.*mlp.gate$"],
    }
    (dst / "config.json").write_text(json.dumps(config))
    tensors = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if name.startswith("model.language_model.layers.") and name.endswith("_proj.weight"):
            q, s = quantize_per_channel(t)
            tensors[name], tensors[name + "_scale"] = q.contiguous(), s.contiguous()
        else:
            tensors[name] = t
    save_file(tensors, str(dst / "model.safetensors"))


def _prefill_logits(model, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, V] float32
    n = ids.shape[0]
    pos = torch.arange(n, device=ids.device)[None].expand(3, -1)
    with torch.inference_mode():
        return model.compute_logits(model(ids, pos, AttentionMetadata.prefill([n], device="cuda")))


def test_tiny_fp8_checkpoint_agrees_with_bf16(tiny_ckpt_45: Path, tmp_path: Path) -> None:
    _fp8_checkpoint(tiny_ckpt_45, tmp_path)
    fp8 = load_model(tmp_path, torch.bfloat16, "cuda", vision=False)
    assert fp8.fp8
    assert fp8.language_model.layers[0].self_attn.qkv_proj.weight.dtype == FP8
    assert fp8.language_model.layers[1].mlp.experts.w13_weight.dtype == FP8
    assert fp8.lm_head.weight.dtype == torch.bfloat16
    bf16 = load_model(tiny_ckpt_45, torch.bfloat16, "cuda", vision=False)
    # the same checkpoint with --quantization none: dequantised at load, bf16 GEMMs
    dequantised = load_model(tmp_path, torch.bfloat16, "cuda", vision=False, quantization="none")
    assert not dequantised.fp8
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, fp8.config.text.vocab_size - 10, (48,), generator=gen).cuda()
    got, want = _prefill_logits(fp8, ids), _prefill_logits(bf16, ids)
    assert (got - want).abs().max() < 0.1 * want.abs().max()
    assert (got - _prefill_logits(dequantised, ids)).abs().max() < 0.1 * want.abs().max()
    # greedy choice at every position (teacher forced): mostly the same, and always the same
    # where the bf16 model's top-2 margin exceeds twice the largest logit difference
    agree = got.argmax(-1) == want.argmax(-1)
    assert agree.float().mean() >= 0.75
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (got - want).abs().amax(-1)
    assert agree[clear].all()


def _real_width_config(dst: Path, layers: int) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "glm4v_moe",
        "text_config": {"num_hidden_layers": layers, "head_dim": 128},
        "vision_config": {},
    }
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_dummy_fp8_at_real_widths_is_fast_and_half_the_bytes(tmp_path: Path) -> None:
    path = _real_width_config(tmp_path, layers=2)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    model = load_model(path, torch.bfloat16, "cuda", "dummy", vision=False, quantization="fp8")
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"dummy FP8 build took {elapsed:.1f} s"
    # the same model in bf16, on the meta device (no memory): the layers' byte count to halve
    with torch.device("meta"):
        ref = Glm4vMoeForCausalLM(load_model_config(path), torch.bfloat16, vision=False)
    fp8_layers = _bytes(model.language_model.layers.parameters())
    bf16_layers = _bytes(ref.language_model.layers.parameters())
    assert 0.49 * bf16_layers < fp8_layers < 0.52 * bf16_layers
    total = _bytes(model.parameters())
    assert torch.cuda.memory_allocated() - base >= total
    # never a bf16 copy of the layers: the peak stays near the FP8 model plus scratch
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < total + 1.5 * 2**30
    experts = model.language_model.layers[1].mlp.experts
    # 128 routed experts and the shared one in the last slot
    assert experts.w13_weight.dtype == FP8 and experts.w13_weight.shape == (129, 2816, 4096)
    scale = experts.w13_weight_scale
    assert torch.isfinite(scale).all() and 1e-5 < float(scale.median()) < 1e-3
    ids = torch.arange(1, 9, device="cuda")
    assert torch.isfinite(_prefill_logits(model, ids)).all()
