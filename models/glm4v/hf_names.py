"""Transformers' in-memory GLM-4.5V / GLM-4.6V tensors -> the checkpoint's tensor names.

Contract: transformers' ``Glm4vMoeForConditionalGeneration`` keeps each MoE layer's routed
experts fused (``...mlp.experts.gate_up_proj [E, 2I, H]``, gate rows then up rows, and
``...mlp.experts.down_proj [E, H, I]``); a checkpoint stores one tensor per expert
(``...mlp.experts.{e}.gate_proj.weight [I, H]``, ``up_proj``, ``down_proj [H, I]``). Every
other name is the same in both.
- ``checkpoint_entries(name, tensor)``: the checkpoint (name, tensor) pairs of one in-memory
  tensor, as views of it (same device and dtype, no copy).
- ``checkpoint_tensors(state)``: the same over a whole state dict, in its order; feed it to
  ``Glm4vMoeForCausalLM.load_weights`` to copy a transformers model into Glimpse's.
- ``export_weights(model)``: the checkpoint dict a safetensors writer wants: CPU, contiguous,
  bf16 (the router's ``e_score_correction_bias`` stays float32, as in the released checkpoints).

Not here: mapping checkpoint names onto Glimpse's fused parameters (``model.py``), file I/O.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

_GATE_UP = "mlp.experts.gate_up_proj"
_DOWN = "mlp.experts.down_proj"
_ROUTER_BIAS = "e_score_correction_bias"


def checkpoint_entries(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One transformers tensor -> its checkpoint (name, view) pairs."""
    if name.endswith(_GATE_UP):  # [E, 2I, H]
        base = name.removesuffix("gate_up_proj")
        inter = tensor.shape[1] // 2
        out = []
        for e in range(tensor.shape[0]):
            out.append((f"{base}{e}.gate_proj.weight", tensor[e, :inter]))
            out.append((f"{base}{e}.up_proj.weight", tensor[e, inter:]))
        return out
    if name.endswith(_DOWN):  # [E, H, I]
        base = name.removesuffix("down_proj")
        return [(f"{base}{e}.down_proj.weight", tensor[e]) for e in range(tensor.shape[0])]
    return [(name, tensor)]


def checkpoint_tensors(
    state: Mapping[str, torch.Tensor],
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in state.items():
        yield from checkpoint_entries(name, tensor)


def export_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A transformers model's weights under checkpoint names, on CPU, ready to save."""
    out: dict[str, torch.Tensor] = {}
    for name, t in checkpoint_tensors(model.state_dict()):
        dtype = torch.float32 if name.endswith(_ROUTER_BIAS) else torch.bfloat16
        out[name] = t.detach().cpu().to(dtype).contiguous()
    return out
