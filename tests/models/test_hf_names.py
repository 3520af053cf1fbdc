"""transformers' in-memory names -> checkpoint names: the tiny checkpoint file is the reference.

transformers loads the tiny checkpoint (per-expert tensors) and fuses the experts; converting its
state dict back must give exactly the file's names and values, and Glimpse's ``load_weights``
must accept the result as a complete checkpoint.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from models.glm4v.config import load_model_config
from models.glm4v.hf_names import checkpoint_tensors, export_weights
from models.glm4v.loader import build_model


def _hf_model(ckpt):
    from transformers import Glm4vMoeForConditionalGeneration

    return Glm4vMoeForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)


def test_converted_state_equals_checkpoint_file(tiny_ckpt_45) -> None:
    hf = _hf_model(tiny_ckpt_45)
    file = load_file(tiny_ckpt_45 / "model.safetensors")
    converted = dict(checkpoint_tensors(hf.state_dict()))
    assert sorted(converted) == sorted(file)
    for name, tensor in file.items():
        assert torch.equal(converted[name], tensor.float()), name
    # views, not copies: the conversion must not double a 100 GB model in memory
    fused = dict(hf.named_parameters())
    gate_up = next(n for n in fused if n.endswith("mlp.experts.gate_up_proj"))
    view = converted[gate_up.removesuffix("gate_up_proj") + "1.up_proj.weight"]
    assert view.untyped_storage().data_ptr() == fused[gate_up].untyped_storage().data_ptr()


def test_export_weights_dtypes_and_device(tiny_ckpt_45) -> None:
    out = export_weights(_hf_model(tiny_ckpt_45))
    bias = [n for n in out if n.endswith("e_score_correction_bias")]
    assert bias and all(out[n].dtype == torch.float32 for n in bias)
    assert all(t.dtype == torch.bfloat16 for n, t in out.items() if n not in bias)
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in out.values())


def test_glimpse_loads_a_transformers_model(tiny_ckpt_45) -> None:
    hf = _hf_model(tiny_ckpt_45)
    config = load_model_config(tiny_ckpt_45)
    ours = build_model(config, torch.float32, torch.device("cpu"), vision=True, text=True)
    report = ours.load_weights(checkpoint_tensors(hf.state_dict()))
    assert report.unexpected == []
    assert set(ours.checkpoint_names()) <= report.loaded
    experts = ours.language_model.layers[1].mlp.experts
    hf_experts = hf.model.language_model.layers[1].mlp.experts
    n = config.text.n_routed_experts
    assert torch.equal(experts.w13_weight[:n], hf_experts.gate_up_proj)
    assert torch.equal(experts.w2_weight[:n], hf_experts.down_proj)
    # the shared expert fills the stacked slot after the routed ones: gate rows, then up rows
    shared = hf.model.language_model.layers[1].mlp.shared_experts
    gate_up = torch.cat([shared.gate_proj.weight, shared.up_proj.weight])
    assert torch.equal(experts.w13_weight[n], gate_up)
    assert torch.equal(experts.w2_weight[n], shared.down_proj.weight)
