"""The whole GLM-4.5V / GLM-4.6V model: vision tower, MoE text decoder, lm_head, weight mapping.

Contract: ``Glm4vMoeForCausalLM(config, dtype, vision=True, text=True)`` holds ``.visual``
(``VisionTower``), ``.language_model`` (``Glm4vMoeTextModel``) and ``.lm_head``; either half may
be left out (encoder processes build only the tower, decoder ranks only the text half).
- ``forward(input_ids [T], positions [3, T], meta, mm_embeds [N_mm, H] | None,
  mm_mask [T] bool | None) -> hidden [T, H]`` writes ``mm_embeds`` (in order) over the token
  embeddings where ``mm_mask`` is set, then runs the decoder.
- ``compute_logits(hidden [N, H], out=None) -> [N, V] float32`` (written into ``out`` when given).
- ``load_weights(iterable of (checkpoint name, tensor)) -> LoadReport`` maps checkpoint names
  (``model.language_model.*``, ``model.visual.*``, ``lm_head.*``) onto the fused parameters
  through their weight loaders (a shared expert's tensors land in its stacked expert slots when
  the MoE block holds it there); ``checkpoint_names()`` lists every tensor the built parts need.
- ``fp8=True`` keeps the text decoder's projection and expert weights as FP8 codes with
  per-output-channel scales (``models/layers/fp8.py``); ``load_weights`` then also takes
  ``<weight name>_scale`` ``[out, 1]`` tensors, and ``fp8_checkpoint_name(name)`` says which
  checkpoint weights the loader should hand over as FP8 codes. Embeddings, lm_head, norms, the
  router and the vision tower stay in ``dtype``.

What does not belong here: reading files and FP8 dequantisation (loader.py), positions
(processing/rope_index.py), sampling, KV cache management.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from models.glm4v.config import ModelConfig
from models.glm4v.errors import CheckpointError
from models.glm4v.text_model import Glm4vMoeTextModel
from models.layers.attention import AttentionMetadata
from models.layers.fp8 import convert_to_fp8
from models.layers.linear import ColumnParallelLinear, check_shape, default_weight_loader

TEXT_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."
LM_HEAD = "lm_head.weight"

# checkpoint sub-name -> (our fused sub-name, shard id). The vision tower's SwiGLUs (block MLPs,
# merger) stack gate|up as the text MLPs do; it has no q/k/v tensors (its qkv is one tensor)
_STACKED = (
    (".self_attn.q_proj.", ".self_attn.qkv_proj.", "q"),
    (".self_attn.k_proj.", ".self_attn.qkv_proj.", "k"),
    (".self_attn.v_proj.", ".self_attn.qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight(_scale)?$")
_SHARED = re.compile(r"^(layers\.\d+\.mlp)\.shared_experts\.(gate|up|down)_proj\.weight(_scale)?$")
_LAYER = re.compile(r"^layers\.(\d+)\.")
_EXPERT_SHARD = {
    "gate": ("w13_weight", "w1"),
    "up": ("w13_weight", "w3"),
    "down": ("w2_weight", "w2"),
}


def _stacked(sub: str) -> tuple[str, object]:
    """A checkpoint sub-name -> (our parameter's sub-name, shard id); shard None: not stacked."""
    for ckpt_part, ours, shard in _STACKED:
        if ckpt_part in "." + sub:
            return ("." + sub).replace(ckpt_part, ours, 1)[1:], shard
    return sub, None


def build_vision_tower(config: ModelConfig, dtype: torch.dtype | None) -> nn.Module:
    """The tower on the current default device, parameters in ``dtype``."""
    from models.glm4v.vision import VisionTower  # imported late: text-only ranks skip it

    tower = VisionTower(config.vision)
    if dtype is not None:
        # parameters only: the tower's float32 rotary buffer must stay float32
        for p in tower.parameters():
            p.data = p.data.to(dtype)
    return tower


class LoadReport(NamedTuple):
    loaded: set[str]  # checkpoint names copied into parameters
    unexpected: list[str]  # names that match nothing in the built model


class Glm4vMoeForCausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype | None = None,
        vision: bool = True,
        text: bool = True,
        fp8: bool = False,
    ) -> None:
        super().__init__()
        if not (vision or text):
            raise ValueError("build at least one of the vision tower and the text decoder")
        self.config = config
        self.fp8 = fp8 and text
        self.visual: nn.Module | None = None
        self.language_model: Glm4vMoeTextModel | None = None
        self.lm_head: ColumnParallelLinear | None = None
        if vision:
            self.visual = build_vision_tower(config, dtype)
        if text:
            tc = config.text
            self.language_model = Glm4vMoeTextModel(tc, dtype)
            if fp8:
                convert_to_fp8(self.language_model)
            self.lm_head = ColumnParallelLinear(
                tc.hidden_size, tc.vocab_size, bias=False, gather_output=True, dtype=dtype
            )

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [3, T] int64 (or [T] for text-only)
        meta: AttentionMetadata,
        mm_embeds: torch.Tensor | None = None,  # [N_mm, H], vision embeddings in prompt order
        mm_mask: torch.Tensor | None = None,  # [T] bool, True at placeholder tokens
    ) -> torch.Tensor:  # [T, H]
        lm = self._text()
        embeds = None
        if mm_embeds is not None and mm_embeds.shape[0] > 0:
            if mm_mask is None:
                raise ValueError("mm_embeds given without mm_mask")
            n_slots = int(mm_mask.sum())
            if n_slots != mm_embeds.shape[0]:
                raise ValueError(
                    f"{mm_embeds.shape[0]} vision embeddings for {n_slots} placeholder tokens"
                )
            embeds = lm.embed(input_ids)
            embeds[mm_mask] = mm_embeds.to(embeds.dtype)
        return lm(input_ids, positions, meta, inputs_embeds=embeds)

    def compute_logits(
        self,
        hidden: torch.Tensor,  # [N, H]
        out: torch.Tensor | None = None,  # [N, V] float32 to write into (a static graph buffer)
    ) -> torch.Tensor:  # [N, V] float32
        if self.lm_head is None:
            raise RuntimeError("this model was built without the text decoder")
        logits = self.lm_head(hidden)
        # the cast to float32 is the one copy either way: into a new tensor or into ``out``
        return logits.float() if out is None else out.copy_(logits)

    def _text(self) -> Glm4vMoeTextModel:
        if self.language_model is None:
            raise RuntimeError("this model was built without the text decoder")
        return self.language_model

    # ---- weights -------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> LoadReport:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unexpected: list[str] = []
        for name, tensor in weights:
            try:
                targets = self._targets(name, tensor)
            except CheckpointError as exc:
                raise CheckpointError(f"tensor {name!r}: {exc}") from exc
            if targets is None:
                continue  # part not built here, or a tensor the model never uses (MTP layers)
            if not targets:
                unexpected.append(name)
                continue
            for param_name, loaded_part, shard in targets:
                param = params.get(param_name)
                if param is None:
                    unexpected.append(name)
                    break
                loader = getattr(param, "weight_loader", default_weight_loader)
                try:
                    with torch.no_grad():
                        if shard is None:
                            loader(param, loaded_part)
                        elif isinstance(shard, tuple):
                            loader(param, loaded_part, *shard)
                        else:
                            loader(param, loaded_part, shard)
                except CheckpointError as exc:
                    raise CheckpointError(f"tensor {name!r}: {exc}") from exc
            else:
                loaded.add(name)
        return LoadReport(loaded, unexpected)

    def _targets(
        self, name: str, tensor: torch.Tensor
    ) -> list[tuple[str, torch.Tensor, object]] | None:
        """(our param, tensor part, shard id) list; [] = unknown name; None = skip quietly."""
        if name.startswith(VISION_PREFIX):
            if self.visual is None:
                return None
            param, shard = _stacked(name[len(VISION_PREFIX) :])
            return [(f"visual.{param}", tensor, shard)]
        if name == LM_HEAD:
            return None if self.lm_head is None else [("lm_head.weight", tensor, None)]
        if not name.startswith(TEXT_PREFIX):
            return []
        if self.language_model is None:
            return None
        sub = name[len(TEXT_PREFIX) :]
        layer = _LAYER.match(sub)
        if layer and int(layer.group(1)) >= self.config.text.num_hidden_layers:
            return None  # next-token-prediction (MTP) layers are not served
        if "rotary_emb." in sub:
            return None
        out: list[tuple[str, torch.Tensor, object]] = []
        if sub == "embed_tokens.weight" and self.config.text.tie_word_embeddings:
            out.append(("lm_head.weight", tensor, None))
        if m := _EXPERT.match(sub):
            param, shard = _EXPERT_SHARD[m.group(3)]
            param += m.group(4) or ""  # "_scale" for an FP8 weight's scale
            out.append((f"language_model.{m.group(1)}.{param}", tensor, (shard, int(m.group(2)))))
            return out
        if (m := _SHARED.match(sub)) and (slotted := self._shared_slots(m.group(1), m, tensor)):
            return slotted
        param, shard = _stacked(sub)
        if shard is not None:
            return [(f"language_model.{param}", tensor, shard)]
        out.append((f"language_model.{sub}", tensor, None))
        return out

    def _shared_slots(
        self, block: str, m: re.Match, tensor: torch.Tensor
    ) -> list[tuple[str, torch.Tensor, object]]:
        """A shared-expert tensor of width n*I as the n expert slots E..E+n-1 it fills, when
        the block holds its shared experts in the stacked slots; [] when it does not."""
        experts = self._text().get_submodule(block).experts
        n = experts.num_shared
        if not n:
            return []
        kind, scale = m.group(2), m.group(3) or ""
        param, shard = _EXPERT_SHARD[kind]
        target = f"language_model.{block}.experts.{param}{scale}"
        inter, hidden = experts.intermediate_size, experts.hidden_size
        if not scale:  # the whole tensor first: a slice of a wrong-sized one would load quietly
            check_shape(tensor, (hidden, n * inter) if kind == "down" else (n * inter, hidden))
        if kind != "down":  # gate/up rows (and their per-row scales): slot j holds rows j*I..
            parts = [tensor.narrow(0, j * inter, inter) for j in range(n)]
        elif scale:  # the down projection's per-row scales cover every slot's columns
            parts = [tensor] * n
        else:  # the down projection's columns
            parts = [tensor.narrow(1, j * inter, inter) for j in range(n)]
        return [(target, part, (shard, experts.num_experts + j)) for j, part in enumerate(parts)]

    def fp8_checkpoint_name(self, name: str) -> bool:
        """Whether the checkpoint weight ``name`` lands in an FP8 parameter of this model: the
        text decoder's attention, MLP, shared-expert and routed-expert projections."""
        if not (self.fp8 and name.startswith(TEXT_PREFIX) and name.endswith("_proj.weight")):
            return False
        layer = _LAYER.match(name[len(TEXT_PREFIX) :])
        # MTP layers past num_hidden_layers are dropped anyway: no need to requantise them
        return layer is not None and int(layer.group(1)) < self.config.text.num_hidden_layers

    def checkpoint_names(self) -> list[str]:
        """Every checkpoint tensor the built parts need (the loader reports the missing ones)."""
        names: list[str] = []
        if self.visual is not None:
            # the tower's state_dict speaks checkpoint names (gate_proj / up_proj, not its
            # stacked gate_up_proj parameters)
            names += [VISION_PREFIX + n for n in self.visual.state_dict()]
        if self.language_model is None:
            return names
        tc = self.config.text
        if not tc.tie_word_embeddings:
            names.append(LM_HEAD)
        names += [TEXT_PREFIX + "embed_tokens.weight", TEXT_PREFIX + "norm.weight"]
        for i in range(tc.num_hidden_layers):
            p = f"{TEXT_PREFIX}layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
            if tc.attention_bias:
                names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
            mlps = [p + "mlp"]
            if tc.is_moe_layer(i):
                names += [p + "mlp.gate.weight", p + "mlp.gate.e_score_correction_bias"]
                mlps = [p + f"mlp.experts.{e}" for e in range(tc.n_routed_experts)]
                if tc.n_shared_experts > 0:
                    mlps.append(p + "mlp.shared_experts")
            for m in mlps:
                names += [f"{m}.{x}_proj.weight" for x in ("gate", "up", "down")]
        return names
