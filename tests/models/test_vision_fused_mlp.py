"""The vision tower's SwiGLUs run gate and up as one GEMM over a stacked ``gate_up_proj`` weight.

Real GLM-4.5V / 4.6V checkpoints store ``gate_proj`` and ``up_proj`` separately (block MLPs and the
merger); the tiny checkpoint does too. They must land in the stacked weight gate rows first, give
what the two separate projections gave, keep their names in ``state_dict`` (the demo trainer and
the encoder benchmark trade state dicts with transformers' tower), and broken tensors must still
be named. Also: the downsample GEMM reads its weight without a copy, and training still gets
gradients where the SiLU kernel serves inference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models.glm4v.config import load_model_config
from models.glm4v.errors import CheckpointError
from models.glm4v.loader import load_model
from models.glm4v.vision import SwiGLU, VisionTower

PREFIX = "model.visual."
TOL = 1e-4  # max abs error / max abs value, float32


@pytest.fixture(scope="module")
def file_tensors(tiny_ckpt_45: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(tiny_ckpt_45 / "model.safetensors"))
    return {k[len(PREFIX) :]: v.float() for k, v in weights.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def tower(tiny_ckpt_45: Path) -> VisionTower:
    return load_model(tiny_ckpt_45, torch.float32, "cpu", vision=True, text=False).visual


def _swiglus(tower: VisionTower) -> dict[str, torch.nn.Module]:
    """Checkpoint prefix -> module, for every SwiGLU of the tower."""
    mlps = {f"blocks.{i}.mlp.": b.mlp for i, b in enumerate(tower.blocks)}
    return mlps | {"merger.": tower.merger}


def _close(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@torch.no_grad()
def test_separate_gate_and_up_load_into_the_stacked_weight_and_compute_the_same(
    tower, file_tensors
) -> None:
    gen = torch.Generator().manual_seed(0)
    for prefix, mlp in _swiglus(tower).items():
        gate, up = (
            file_tensors[prefix + "gate_proj.weight"],
            file_tensors[prefix + "up_proj.weight"],
        )
        assert torch.equal(mlp.gate_up_proj.weight, torch.cat([gate, up])), prefix
        assert mlp.gate_up_proj.bias is None  # GLM-4V's vision MLPs have no biases
        x = torch.randn(7, gate.shape[1], generator=gen)
        # what the tower computed with two GEMMs before the fusion
        two_gemms = (F.silu(x @ gate.T) * (x @ up.T)) @ file_tensors[prefix + "down_proj.weight"].T
        # the merger's own forward runs proj, norm and GELU first: call its SwiGLU part
        assert _close(SwiGLU.forward(mlp, x), two_gemms) < 1e-6, prefix


@torch.no_grad()
def test_loaded_tower_matches_transformers_tower(tiny_ckpt_45, tower) -> None:
    from transformers import Glm4vMoeForConditionalGeneration

    hf = Glm4vMoeForConditionalGeneration.from_pretrained(tiny_ckpt_45, dtype=torch.float32)
    grid = torch.tensor([[1, 8, 12], [1, 6, 6]])
    n = int(grid.prod(-1).sum())
    pixels = torch.randn(n, tower.cfg.patch_dim, generator=torch.Generator().manual_seed(1))
    ref = hf.model.visual(pixels, grid_thw=grid).pooler_output
    assert _close(tower(pixels, grid), ref) < TOL


@torch.no_grad()
def test_state_dict_keeps_checkpoint_names_and_round_trips(tiny_ckpt_45, tower, file_tensors):
    state = tower.state_dict()
    assert sorted(state) == sorted(file_tensors)  # gate_proj / up_proj, no gate_up_proj
    for name, t in file_tensors.items():
        assert torch.equal(state[name], t), name

    fresh = VisionTower(tower.cfg)
    fresh.load_state_dict(state, strict=True)
    for name, p in tower.named_parameters():
        assert torch.equal(dict(fresh.named_parameters())[name], p), name

    # and into transformers' tower, as bench/encoder_bench.py and the demo trainer do
    from transformers import Glm4vMoeForConditionalGeneration

    hf = Glm4vMoeForConditionalGeneration.from_pretrained(tiny_ckpt_45, dtype=torch.float32)
    for p in hf.model.visual.parameters():
        p.zero_()
    result = hf.model.visual.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(hf.model.visual.merger.up_proj.weight, file_tensors["merger.up_proj.weight"])


def _broken_checkpoint(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(json.loads((src / "config.json").read_text())))
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_wrong_shaped_or_missing_half_is_named(tiny_ckpt_45: Path, tmp_path: Path) -> None:
    good = load_file(str(tiny_ckpt_45 / "model.safetensors"))
    name = PREFIX + "blocks.1.mlp.up_proj.weight"
    bad = dict(good)
    bad[name] = good[name][:-1].clone()
    path = _broken_checkpoint(tiny_ckpt_45, tmp_path / "short", bad)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_model(path, torch.float32, "cpu", text=False)

    missing = PREFIX + "merger.gate_proj.weight"
    path = _broken_checkpoint(
        tiny_ckpt_45, tmp_path / "missing", {k: v for k, v in good.items() if k != missing}
    )
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        load_model(path, torch.float32, "cpu", text=False)


@torch.no_grad()
def test_dummy_weights_fill_both_halves(tiny_ckpt_45: Path) -> None:
    tower = load_model(
        tiny_ckpt_45, torch.bfloat16, "cpu", load_format="dummy", vision=True, text=False
    ).visual
    for prefix, mlp in _swiglus(tower).items():
        gate, up = mlp.gate_up_proj.weight.float().chunk(2)
        assert 0.01 < gate.std() < 0.03 and 0.01 < up.std() < 0.03, prefix
        assert not torch.equal(gate, up), prefix
    grid = torch.tensor([[1, 4, 4]])
    out = tower(torch.randn(16, tower.cfg.patch_dim, dtype=torch.bfloat16), grid)
    assert out.shape == (4, tower.cfg.out_hidden_size) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("load_format", ["safetensors", "dummy"])
def test_downsample_weight_is_read_in_place(tiny_ckpt_45: Path, load_format: str) -> None:
    """The downsample GEMM contracts each merge block's (m, m, C) row with the weight in that
    order; the weight is stored so this is a view, not a per-forward copy, after any load."""
    tower = load_model(
        tiny_ckpt_45, torch.bfloat16, "cpu", load_format=load_format, vision=True, text=False
    ).visual
    assert tower.downsample.weight.permute(0, 2, 3, 1).is_contiguous()
    moved = VisionTower(tower.cfg).to(torch.float16)
    moved.load_state_dict(tower.state_dict())
    assert moved.downsample.weight.permute(0, 2, 3, 1).is_contiguous()


def test_training_gets_gradients_where_the_silu_kernel_serves_inference(
    tiny_ckpt_45, monkeypatch
) -> None:
    """The SiLU-mul kernel has no backward: while autograd records, the torch ops must run."""
    from models.layers import activation

    tower = VisionTower(load_model_config(tiny_ckpt_45).vision)
    calls = []

    def kernel(gate, up):  # stands in for the Triton kernel (no autograd graph)
        calls.append(gate.shape)
        return (F.silu(gate) * up).detach()

    monkeypatch.setattr(activation, "triton_enabled", lambda t: True)
    monkeypatch.setattr(activation.kernel, "supported", lambda g, u: True)
    monkeypatch.setattr(activation.kernel, "silu_mul", kernel)
    grid = torch.tensor([[1, 4, 4]])
    pixels = torch.randn(16, tower.cfg.patch_dim)
    with torch.no_grad():
        tower(pixels, grid)
    assert len(calls) == len(tower.blocks) + 1  # inference takes the kernel in every SwiGLU
    tower(pixels, grid).square().sum().backward()
    assert len(calls) == len(tower.blocks) + 1  # training did not
    for prefix, mlp in _swiglus(tower).items():
        assert mlp.gate_up_proj.weight.grad.abs().sum() > 0, prefix
