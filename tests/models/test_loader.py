"""Checkpoint loading: sharded indexes, broken checkpoints, FP8 formats, partial and dummy models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.glm4v.config import ModelConfig
from models.glm4v.errors import CheckpointError
from models.glm4v.loader import load_model
from models.glm4v.model import Glm4vMoeForCausalLM
from models.layers.attention import AttentionMetadata

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def _copy_config(src: Path, dst: Path, quant: dict | None = None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    if quant is not None:
        config["quantization_config"] = quant
    (dst / "config.json").write_text(json.dumps(config))


def _write_sharded(tensors: dict[str, torch.Tensor], dst: Path, n_shards: int) -> list[str]:
    """Text tensors round-robin over ``n_shards - 1`` files, the vision tower in the last."""
    files = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    parts: list[dict[str, torch.Tensor]] = [{} for _ in files]
    text_names = [n for n in sorted(tensors) if not n.startswith("model.visual.")]
    for i, name in enumerate(text_names):
        parts[i % (n_shards - 1)][name] = tensors[name]
    for name in tensors:
        if name.startswith("model.visual."):
            parts[-1][name] = tensors[name]
    weight_map = {}
    for file, part in zip(files, parts, strict=True):
        save_file(part, str(dst / file))
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return files


def _state(model: Glm4vMoeForCausalLM) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def _logits(model: Glm4vMoeForCausalLM, n: int = 9) -> torch.Tensor:
    dev = next(model.parameters()).device
    ids = torch.arange(3, 3 + n, device=dev)
    pos = torch.arange(n, device=dev)[None].expand(3, -1)
    with torch.inference_mode():
        hidden = model(ids, pos, AttentionMetadata.prefill([n], device=dev))
        return model.compute_logits(hidden)


@pytest.fixture(scope="module")
def reference(tiny_ckpt_45: Path) -> Glm4vMoeForCausalLM:
    return load_model(tiny_ckpt_45, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def ckpt_tensors(tiny_ckpt_45: Path) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_ckpt_45 / "model.safetensors"))


def test_sharded_index_loads_the_same_weights(
    tiny_ckpt_45: Path, ckpt_tensors, reference, tmp_path: Path
) -> None:
    _copy_config(tiny_ckpt_45, tmp_path)
    _write_sharded(ckpt_tensors, tmp_path, n_shards=3)
    model = load_model(tmp_path, dtype=torch.float32, device="cpu")
    ref = _state(reference)
    for name, p in _state(model).items():
        assert torch.equal(p, ref[name]), name


def test_missing_shard_is_named(tiny_ckpt_45: Path, ckpt_tensors, tmp_path: Path) -> None:
    _copy_config(tiny_ckpt_45, tmp_path)
    files = _write_sharded(ckpt_tensors, tmp_path, n_shards=3)
    (tmp_path / files[0]).unlink()
    with pytest.raises(CheckpointError, match=files[0]):
        load_model(tmp_path, dtype=torch.float32, device="cpu")
    # an encoder needs only the vision shard, which is still there
    tower_only = load_model(tmp_path, dtype=torch.float32, device="cpu", text=False)
    assert tower_only.language_model is None and tower_only.visual is not None


def test_wrong_shape_names_tensor_and_shapes(
    tiny_ckpt_45: Path, ckpt_tensors, tmp_path: Path
) -> None:
    _copy_config(tiny_ckpt_45, tmp_path)
    bad = dict(ckpt_tensors)
    name = "model.language_model.layers.1.mlp.experts.2.up_proj.weight"
    good_shape = list(bad[name].shape)
    bad[name] = bad[name][:, :-1].contiguous()
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path, dtype=torch.float32, device="cpu")
    msg = str(err.value)
    assert name in msg and str(good_shape) in msg and str(list(bad[name].shape)) in msg


def test_missing_required_tensor_is_named(tiny_ckpt_45: Path, ckpt_tensors, tmp_path: Path) -> None:
    _copy_config(tiny_ckpt_45, tmp_path)
    name = "model.language_model.layers.1.mlp.gate.e_score_correction_bias"
    save_file(
        {k: v for k, v in ckpt_tensors.items() if k != name}, str(tmp_path / "model.safetensors")
    )
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_model(tmp_path, dtype=torch.float32, device="cpu")


def _quantizable(name: str, t: torch.Tensor) -> bool:
    # linear weights of the text decoder; embeddings, router and the vision tower stay high precision
    return (
        name.startswith("model.language_model.layers.")
        and name.endswith("_proj.weight")
        and t.dim() == 2
    )


def _per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # [out, 1]
    return (w.float() / scale).to(FP8), scale


def _blocks(w: torch.Tensor, bo: int, bi: int) -> tuple[torch.Tensor, torch.Tensor]:
    out_dim, in_dim = w.shape
    scale = torch.empty(math.ceil(out_dim / bo), math.ceil(in_dim / bi))
    q = torch.empty(out_dim, in_dim, dtype=FP8)
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            blk = w[r * bo : (r + 1) * bo, c * bi : (c + 1) * bi].float()
            s = blk.abs().max().clamp(min=1e-12) / FP8_MAX
            scale[r, c] = s
            q[r * bo : (r + 1) * bo, c * bi : (c + 1) * bi] = (blk / s).to(FP8)
    return q, scale


@pytest.mark.parametrize("scheme", ["per_channel", "block"])
def test_fp8_checkpoint_dequantises_within_fp8_error(
    scheme: str, tiny_ckpt_45: Path, ckpt_tensors, reference, tmp_path: Path
) -> None:
    block = (16, 24)  # not dividing every dim, so partial edge blocks are exercised
    if scheme == "per_channel":
        quant = {"quant_method": "compressed-tensors", "ignore": ["lm_head", "re:.*visual.*"]}
    else:
        quant = {"quant_method": "fp8", "weight_block_size": list(block)}
    _copy_config(tiny_ckpt_45, tmp_path, quant)
    tensors: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}  # independent dequantisation of what we wrote
    for name, t in ckpt_tensors.items():
        if not _quantizable(name, t):
            tensors[name] = t
            continue
        if scheme == "per_channel":
            q, s = _per_channel(t)
            tensors[name], tensors[name + "_scale"] = q, s
            expected[name] = q.float() * s
        else:
            q, s = _blocks(t, *block)
            tensors[name], tensors[name + "_scale_inv"] = q, s
            full = s.repeat_interleave(block[0], 0)[: t.shape[0]]
            expected[name] = q.float() * full.repeat_interleave(block[1], 1)[:, : t.shape[1]]
        # within FP8 rounding of the original: 3 mantissa bits, relative error <= 2^-4
        err = (expected[name] - t.float()).abs()
        assert (err <= t.float().abs() * 2**-4 + 1e-6).all()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    model = load_model(tmp_path, dtype=torch.float32, device="cpu")
    params = _state(model)
    qkv = params["language_model.layers.0.self_attn.qkv_proj.weight"]
    hd = model.config.text.head_dim
    q_rows = model.config.text.num_attention_heads * hd
    k_name = "model.language_model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(qkv[q_rows : q_rows + expected[k_name].shape[0]], expected[k_name])
    w13 = params["language_model.layers.1.mlp.experts.w13_weight"]
    up = expected["model.language_model.layers.1.mlp.experts.3.up_proj.weight"]
    assert torch.equal(w13[3, up.shape[0] :], up)
    # the vision tower is never quantized: loaded exactly
    assert torch.equal(
        params["visual.blocks.0.attn.qkv.weight"],
        _state(reference)["visual.blocks.0.attn.qkv.weight"],
    )
    ref_logits, fp8_logits = _logits(reference), _logits(model)
    assert (fp8_logits - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()


def test_fp8_weight_without_scale_is_rejected(
    tiny_ckpt_45: Path, ckpt_tensors, tmp_path: Path
) -> None:
    _copy_config(tiny_ckpt_45, tmp_path, {"quant_method": "compressed-tensors"})
    name = "model.language_model.layers.0.self_attn.o_proj.weight"
    tensors = dict(ckpt_tensors) | {name: ckpt_tensors[name].to(FP8)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="o_proj"):
        load_model(tmp_path, dtype=torch.float32, device="cpu")


def test_vision_only_and_text_only(tiny_ckpt_45: Path, reference) -> None:
    ref = _state(reference)
    tower = load_model(tiny_ckpt_45, dtype=torch.float32, device="cpu", text=False)
    assert tower.language_model is None and tower.lm_head is None
    text = load_model(tiny_ckpt_45, dtype=torch.float32, device="cpu", vision=False)
    assert text.visual is None
    for part in (tower, text):
        for name, p in _state(part).items():
            assert torch.equal(p, ref[name]), name
    assert torch.equal(_logits(text), _logits(reference))


def test_dummy_format_shapes_dtypes(tiny_ckpt_45: Path, reference) -> None:
    model = load_model(tiny_ckpt_45, dtype=torch.bfloat16, device="cpu", load_format="dummy")
    ref = _state(reference)
    params = _state(model)
    assert params.keys() == ref.keys()
    for name, p in params.items():
        assert p.shape == ref[name].shape, name
        # the router's gate and correction bias stay float32 (its logits are float32)
        routing = name.endswith(("e_score_correction_bias", "mlp.gate.weight"))
        want = torch.float32 if routing else torch.bfloat16
        assert p.dtype == want, name
        assert torch.isfinite(p.float()).all(), name
    logits = _logits(model)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert logits.std() > 0


def test_full_size_parameter_counts_on_meta() -> None:
    """The real GLM-4.5V shapes, counted without allocating (numbers from the model card math)."""
    with torch.device("meta"):
        model = Glm4vMoeForCausalLM(ModelConfig(), torch.bfloat16)
    lm = model.language_model

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    assert count(lm.layers[0].self_attn) == 109_066_240
    assert count(lm.layers[0].mlp) == 134_479_872
    assert count(lm.layers[1].mlp) == 2_232_418_432
    assert count(lm) + count(model.lm_head) == 106_852_251_264
    assert count(model.visual) == 858_681_856
    assert count(model) == 107_710_933_120
    assert len(model.checkpoint_names()) == 18_106
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.gpu
def test_dummy_builds_directly_on_cuda(tiny_ckpt_45: Path) -> None:
    model = load_model(tiny_ckpt_45, dtype=torch.bfloat16, device="cuda", load_format="dummy")
    assert all(p.is_cuda for p in model.parameters())
    assert all(b.is_cuda for b in model.buffers())
    logits = _logits(model)
    assert logits.is_cuda and torch.isfinite(logits).all()


def test_unknown_load_format(tiny_ckpt_45: Path) -> None:
    with pytest.raises(ValueError, match="load_format"):
        load_model(tiny_ckpt_45, load_format="pickle")
