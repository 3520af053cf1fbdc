"""FP8 weights on CPU: block -> per-channel re-quantisation, TP/EP sharding of codes and scales,
the FP8 load path of a whole tiny model, the ``--quantization`` flag, unchanged CPU loads."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import models.distributed as distributed
from decoder_service.engine.cli_args import add_engine_arguments, engine_config_from_args
from models.glm4v.config import ModelConfig, load_model_config
from models.glm4v.loader import (
    CheckpointReader,
    build_model,
    dequantize_block,
    fp8_compute_enabled,
    init_dummy_weights,
    load_model,
    requantize_block,
)
from models.layers.attention import AttentionMetadata
from models.layers.fp8 import Fp8LinearMethod, Fp8MoEMethod, quantize_per_channel
from models.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from models.layers.moe import FusedMoE

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def _block_quantize(w: torch.Tensor, bo: int, bi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent 2-D block quantiser: codes [out, in] and scale_inv [ceil(out/bo), ceil(in/bi)]."""
    out_dim, in_dim = w.shape
    scale = torch.empty(math.ceil(out_dim / bo), math.ceil(in_dim / bi))
    q = torch.empty(out_dim, in_dim, dtype=FP8)
    for r in range(scale.shape[0]):
        for c in range(scale.shape[1]):
            blk = w[r * bo : (r + 1) * bo, c * bi : (c + 1) * bi].double()
            s = float(blk.abs().max().clamp(min=1e-12)) / FP8_MAX
            scale[r, c] = s
            q[r * bo : (r + 1) * bo, c * bi : (c + 1) * bi] = (blk / s).float().to(FP8)
    return q, scale


def _row_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent per-row quantiser in float64: codes [out, in], scale [out, 1] float32."""
    s = w.double().abs().amax(1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (w.double() / s).clamp(-FP8_MAX, FP8_MAX).float().to(FP8), s.float()


def _uneven_weight(out_dim: int, in_dim: int, seed: int) -> torch.Tensor:
    """bf16 weight whose 32x32 blocks differ in magnitude by up to 1e4 (wide per-row range)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_dim, in_dim, generator=gen) * 0.02
    mags = 10.0 ** torch.randint(
        -4, 1, (math.ceil(out_dim / 32), math.ceil(in_dim / 32)), generator=gen
    )
    w = w * mags.repeat_interleave(32, 0)[:out_dim].repeat_interleave(32, 1)[:, :in_dim]
    return w.bfloat16()


def test_block_scales_requantised_per_row_within_the_e4m3_bound() -> None:
    w = _uneven_weight(80, 72, seed=1)
    q, scale_inv = _block_quantize(w.float(), 32, 32)
    deq = dequantize_block("w", q, scale_inv, (32, 32))  # what the bf16 path would load
    got = requantize_block("w", q, scale_inv, (32, 32))
    assert got.q.dtype == FP8 and got.q.shape == (80, 72)
    assert got.scale.dtype == torch.float32 and got.scale.shape == (80, 1)
    back = got.q.float() * got.scale
    # e4m3: <= 2^-4 relative in the normal range, <= 2^-10 scale units in the subnormal range
    bound = deq.abs() * 2**-4 + got.scale * 2**-10
    assert ((back - deq).abs() <= bound * (1 + 1e-5)).all()
    # against an independent float64 dequantise-requantise: same scales, same codes up to ties
    ref_q, ref_s = _row_quantize(deq)
    assert torch.allclose(got.scale, ref_s, rtol=1e-6, atol=0)
    same = (got.q.float() == ref_q.float()).float().mean()
    assert same > 0.99
    # overall: close to the dequantised weight the bf16 path serves
    rel = (back - deq.bfloat16().float()).norm() / deq.norm()
    assert rel < 0.05


def _set_parallel(monkeypatch: pytest.MonkeyPatch, rank: int, world: int, ep: bool = False) -> None:
    state = distributed.ParallelState(rank=rank, world_size=world, expert_parallel=ep)
    monkeypatch.setattr(distributed, "_STATE", state)


def _fp8(full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _row_quantize(full)


@pytest.mark.parametrize("as_codes", [True, False], ids=["fp8_codes", "bf16_quantised"])
def test_linear_weight_loaders_shard_codes_and_scales_for_tp2(
    monkeypatch: pytest.MonkeyPatch, as_codes: bool
) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden, hd, heads, kv = 32, 16, 4, 2
    q_w, k_w, v_w = (torch.randn(n * hd, hidden, generator=gen) for n in (heads, kv, kv))
    gate, up = torch.randn(48, hidden, generator=gen), torch.randn(48, hidden, generator=gen)
    down = torch.randn(hidden, 96, generator=gen)
    full_q = {name: _fp8(t) for name, t in {"q": q_w, "k": k_w, "v": v_w}.items()}
    full_q |= {0: _fp8(gate), 1: _fp8(up), "down": _fp8(down)}
    for rank in range(2):
        _set_parallel(monkeypatch, rank, 2)
        qkv = QKVParallelLinear(hidden, hd, heads, kv)
        gu = MergedColumnParallelLinear(hidden, [48, 48])
        row = RowParallelLinear(96, hidden, reduce_results=False)
        for layer in (qkv, gu, row):
            Fp8LinearMethod().create_weights(layer)
            assert layer.weight.dtype == FP8 and layer.weight_scale.shape == (
                layer.weight.shape[0],
                1,
            )
        sources = {"q": q_w, "k": k_w, "v": v_w, 0: gate, 1: up, "down": down}
        for shard, layer in (("q", qkv), ("k", qkv), ("v", qkv), (0, gu), (1, gu), ("down", row)):
            codes, scale = full_q[shard]
            sid = None if shard == "down" else shard
            if as_codes:  # checkpoint FP8 codes + their scale
                layer.weight.weight_loader(layer.weight, codes, sid)
                layer.weight_scale.weight_loader(layer.weight_scale, scale, sid)
            else:  # a high-precision tensor: the loader quantises the full rows itself
                layer.weight.weight_loader(layer.weight, sources[shard].bfloat16(), sid)
        if not as_codes:  # quantised from bf16: the full tensor's own per-row quantisation
            full_q_bf = {k: quantize_per_channel(v.bfloat16()) for k, v in sources.items()}
        else:
            full_q_bf = full_q

        def rows(name, start, n, full=full_q_bf):
            c, s = full[name]
            return c[start : start + n].float(), s[start : start + n]

        # q: heads split 2/2, k and v: one kv head each
        want = [rows("q", rank * 32, 32), rows("k", rank * 16, 16), rows("v", rank * 16, 16)]
        assert torch.equal(qkv.weight.float(), torch.cat([c for c, _ in want]))
        assert torch.equal(qkv.weight_scale, torch.cat([s for _, s in want]))
        want = [rows(0, rank * 24, 24), rows(1, rank * 24, 24)]
        assert torch.equal(gu.weight.float(), torch.cat([c for c, _ in want]))
        assert torch.equal(gu.weight_scale, torch.cat([s for _, s in want]))
        c, s = full_q_bf["down"]
        assert torch.equal(row.weight.float(), c[:, rank * 48 : (rank + 1) * 48].float())
        assert torch.equal(row.weight_scale, s)  # whole output rows on every rank


@pytest.mark.parametrize("ep", [False, True], ids=["tp2", "ep2"])
def test_expert_loaders_shard_codes_and_scales(monkeypatch: pytest.MonkeyPatch, ep: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    n_exp, hidden, inter = 4, 32, 64
    mats = {
        (e, s): torch.randn(*((hidden, inter) if s == "w2" else (inter, hidden)), generator=gen)
        for e in range(n_exp)
        for s in ("w1", "w3", "w2")
    }
    quant = {k: _row_quantize(v) for k, v in mats.items()}
    for rank in range(2):
        _set_parallel(monkeypatch, rank, 2, ep=ep)
        moe = FusedMoE(n_exp, hidden, inter)
        Fp8MoEMethod().create_weights(moe)
        for (e, s), (codes, scale) in quant.items():
            w = moe.w2_weight if s == "w2" else moe.w13_weight
            sc = moe.w2_weight_scale if s == "w2" else moe.w13_weight_scale
            w.weight_loader(w, codes, s, e)
            sc.weight_loader(sc, scale, s, e)
        local = range(rank * 2, rank * 2 + 2) if ep else range(n_exp)
        i = inter if ep else inter // 2
        start = 0 if ep else rank * i
        for j, e in enumerate(local):
            (g, gs), (u, us), (d, ds) = (quant[(e, s)] for s in ("w1", "w3", "w2"))
            w13 = torch.cat([g[start : start + i].float(), u[start : start + i].float()])
            assert torch.equal(moe.w13_weight[j].float(), w13)
            assert torch.equal(
                moe.w13_weight_scale[j], torch.cat([gs[start : start + i], us[start : start + i]])
            )
            assert torch.equal(moe.w2_weight[j].float(), d[:, start : start + i].float())
            assert torch.equal(moe.w2_weight_scale[j], ds)


def _quantised_checkpoint(src: Path, dst: Path, scheme: str) -> None:
    """Copy of the tiny checkpoint with the text decoder's projections in FP8."""
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    if scheme == "per_channel":
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "ignore": ["lm_head"],
        }
    else:
        config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    (dst / "config.json").write_text(json.dumps(config))
    tensors = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if name.startswith("model.language_model.layers.") and name.endswith("_proj.weight"):
            if scheme == "per_channel":
                tensors[name], tensors[name + "_scale"] = _row_quantize(t.float())
            else:
                tensors[name], tensors[name + "_scale_inv"] = _block_quantize(t.float(), 16, 16)
        else:
            tensors[name] = t
    save_file(tensors, str(dst / "model.safetensors"))


def _fp8_model_on_cpu(path: Path):
    """The FP8 compute path's model, built and loaded on CPU (fallback GEMMs)."""
    config = load_model_config(path)
    model = build_model(
        config, torch.float32, torch.device("cpu"), vision=False, text=True, fp8=True
    )
    reader = CheckpointReader(path, lambda n: not n.startswith("model.visual."))
    report = model.load_weights(reader.tensors(config, model.fp8_checkpoint_name))
    missing = [n for n in model.checkpoint_names() if n not in report.loaded]
    assert not missing and not report.unexpected
    return model.eval()


def _logits(model, n: int = 12) -> torch.Tensor:
    ids = torch.arange(5, 5 + n)
    pos = torch.arange(n)[None].expand(3, -1)
    with torch.inference_mode():
        return model.compute_logits(model(ids, pos, AttentionMetadata.prefill([n])))


@pytest.mark.parametrize("scheme", ["per_channel", "block"])
def test_fp8_load_path_matches_dequantised_model(
    scheme: str, tiny_ckpt_45: Path, tmp_path: Path
) -> None:
    _quantised_checkpoint(tiny_ckpt_45, tmp_path, scheme)
    dequantised = load_model(tmp_path, torch.float32, "cpu", vision=False)
    fp8 = _fp8_model_on_cpu(tmp_path)
    params = dict(fp8.named_parameters())
    for name in ("layers.0.self_attn.qkv_proj", "layers.0.mlp.down_proj"):
        assert params[f"language_model.{name}.weight"].dtype == FP8
    # the shared expert rides in the last stacked slot of the routed experts
    w13 = params["language_model.layers.1.mlp.experts.w13_weight"]
    assert (
        w13.dtype == FP8 and w13.shape[0] == load_model_config(tmp_path).text.n_routed_experts + 1
    )
    assert params["language_model.layers.1.mlp.experts.w2_weight_scale"].dtype == torch.float32
    for name in (
        "lm_head.weight",
        "language_model.embed_tokens.weight",
        "language_model.layers.1.mlp.gate.weight",
    ):
        assert params[name].dtype == torch.float32
    ref, got = _logits(dequantised), _logits(fp8)
    if scheme == "per_channel":  # same codes and scales: only the GEMM order differs
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    else:  # re-quantised per row: within FP8 rounding
        assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_fp8_path_quantises_a_bf16_checkpoint(tiny_ckpt_45: Path) -> None:
    ref = load_model(tiny_ckpt_45, torch.float32, "cpu", vision=False)
    fp8 = _fp8_model_on_cpu(tiny_ckpt_45)
    assert fp8.language_model.layers[0].self_attn.o_proj.weight.dtype == FP8
    got, want = _logits(fp8), _logits(ref)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_cpu_loads_of_fp8_checkpoints_still_dequantise(tiny_ckpt_45: Path, tmp_path: Path) -> None:
    _quantised_checkpoint(tiny_ckpt_45, tmp_path, "per_channel")
    model = load_model(tmp_path, torch.float32, "cpu", vision=False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.fp8
    config = load_model_config(tmp_path)
    cpu = torch.device("cpu")
    assert not fp8_compute_enabled(config, cpu, "auto")
    assert not fp8_compute_enabled(config, cpu, "none")
    with pytest.raises(ValueError, match="compute capability"):
        fp8_compute_enabled(config, cpu, "fp8")
    with pytest.raises(ValueError, match="quantization"):
        fp8_compute_enabled(config, cpu, "int4")
    with pytest.raises(ValueError, match="compute capability"):
        load_model(tmp_path, torch.float32, "cpu", vision=False, quantization="fp8")


def test_dummy_fp8_weights_have_realistic_codes_and_scales(tiny_ckpt_45: Path) -> None:
    config = load_model_config(tiny_ckpt_45)
    model = build_model(
        config, torch.float32, torch.device("cpu"), vision=False, text=True, fp8=True
    )
    init_dummy_weights(model, seed=3)
    moe = model.language_model.layers[1].mlp.experts
    w = moe.w13_weight.float() * moe.w13_weight_scale
    assert torch.isfinite(w).all() and abs(w.std().item() - 0.02) < 0.002
    # each row's largest code is the e4m3 maximum: the scale is the row's amax / 448
    assert torch.equal(
        moe.w13_weight.float().abs().amax(-1), torch.full(moe.w13_weight.shape[:2], FP8_MAX)
    )
    assert torch.isfinite(_logits(model)).all()


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return parser.parse_args(["--model-path", "m", *argv])


def test_quantization_flag() -> None:
    assert engine_config_from_args(_parse([])).load.quantization == "auto"
    for mode in ("fp8", "none", "auto"):
        assert engine_config_from_args(_parse(["--quantization", mode])).load.quantization == mode
    with pytest.raises(SystemExit):
        _parse(["--quantization", "int8"])


def test_auto_follows_the_checkpoint_config() -> None:
    plain = ModelConfig()
    quantised = ModelConfig.from_dict(
        {
            "model_type": "glm4v_moe",
            "text_config": {"head_dim": 128},
            "quantization_config": {"quant_method": "compressed-tensors"},
        }
    )
    assert plain.quant.method is None and quantised.quant.method == "compressed-tensors"
    meta = torch.device("meta")  # never an FP8-capable device
    assert not fp8_compute_enabled(plain, meta, "auto")
    assert not fp8_compute_enabled(quantised, meta, "auto")
