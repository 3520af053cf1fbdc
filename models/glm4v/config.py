"""Frozen configuration of a GLM-4.5V / GLM-4.6V (``glm4v_moe``) checkpoint.

Contract: ``load_model_config(path)`` reads ``config.json`` from a checkpoint directory (or
``ModelConfig.from_dict`` a parsed dict) and returns a ``ModelConfig`` whose numbers are the ones
every other module uses. Both config formats are accepted: GLM-4.5V (``rope_scaling`` plus a
top-level ``rope_theta``, transformers 4.5x) and GLM-4.6V (``rope_parameters``, transformers 5.x).
Processor settings (pixel budgets, fps) are not here: they live in the processor config files.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models.glm4v.errors import ConfigError, UnknownModelTypeError

SUPPORTED_MODEL_TYPES = ("glm4v_moe",)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 10944  # dense MLP width (layers < first_k_dense_replace)
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    head_dim: int = 128
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    mrope_section: tuple[int, ...] = (8, 12, 12)  # frequency pairs for (t, h, w)
    max_position_embeddings: int = 65536
    first_k_dense_replace: int = 1
    n_routed_experts: int = 128
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    moe_intermediate_size: int = 1408
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    attention_bias: bool = True
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = (151329, 151336, 151338)
    pad_token_id: int | None = 151329

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 12
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    image_size: int = 336  # learned position table covers (image_size/patch_size)^2 patches
    intermediate_size: int = 10944  # merger MLP width
    out_hidden_size: int = 4096  # = text hidden; also the block MLP width
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch: C * T * P * P (1176 for the real model)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class QuantConfig:
    """Weight quantization read from ``quantization_config``; ``method`` None means unquantized."""

    method: str | None = None  # "fp8" (block scales) or "compressed-tensors" (per-channel)
    weight_block_size: tuple[int, int] | None = None  # (128, 128) for block FP8
    ignored_modules: tuple[str, ...] = ()  # prefixes kept in high precision


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    model_type: str = "glm4v_moe"
    image_token_id: int = 151363
    video_token_id: int = 151364
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    video_start_token_id: int = 151341
    video_end_token_id: int = 151342
    torch_dtype: str = "bfloat16"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnknownModelTypeError(
                f"unsupported model_type {model_type!r}; Glimpse serves {SUPPORTED_MODEL_TYPES}"
            )
        try:
            text = _parse_text(raw.get("text_config") or {}, raw)
            vision = _parse_vision(raw.get("vision_config") or {})
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"malformed config.json: {exc}") from exc
        if vision.out_hidden_size != text.hidden_size:
            raise ConfigError(
                f"vision out_hidden_size {vision.out_hidden_size} != text hidden_size "
                f"{text.hidden_size}"
            )
        if 2 * sum(text.mrope_section) != text.rotary_dim:
            raise ConfigError(
                f"mrope_section {list(text.mrope_section)} must sum to rotary_dim/2 = "
                f"{text.rotary_dim // 2}"
            )
        ids = {
            k: int(raw.get(k, getattr(cls, k)))
            for k in (
                "image_token_id",
                "video_token_id",
                "image_start_token_id",
                "image_end_token_id",
                "video_start_token_id",
                "video_end_token_id",
            )
        }
        dtype = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        return cls(
            text=text,
            vision=vision,
            quant=_parse_quant(raw.get("quantization_config")),
            model_type=model_type,
            torch_dtype=str(dtype),
            **ids,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_model_config(model_path: str | Path) -> ModelConfig:
    path = Path(model_path) / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json in {Path(model_path)}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config.json is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("config.json must hold a JSON object")
    return ModelConfig.from_dict(raw)


def _parse_text(tc: dict[str, Any], top: dict[str, Any]) -> TextConfig:
    d = TextConfig()
    # GLM-4.6V (transformers 5.x) nests theta/sections in rope_parameters; GLM-4.5V uses
    # rope_scaling for the sections and a rope_theta beside it.
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    theta = rope.get("rope_theta", tc.get("rope_theta", top.get("rope_theta", d.rope_theta)))
    section = rope.get("mrope_section", d.mrope_section)
    partial = rope.get(
        "partial_rotary_factor", tc.get("partial_rotary_factor", d.partial_rotary_factor)
    )
    hidden = int(tc.get("hidden_size", d.hidden_size))
    heads = int(tc.get("num_attention_heads", d.num_attention_heads))
    eos = tc.get("eos_token_id", top.get("eos_token_id", list(d.eos_token_ids)))
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))

    def get(name: str, cast=int):
        return cast(tc.get(name, getattr(d, name)))

    return TextConfig(
        vocab_size=get("vocab_size"),
        hidden_size=hidden,
        intermediate_size=get("intermediate_size"),
        num_hidden_layers=get("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=get("num_key_value_heads"),
        head_dim=int(tc.get("head_dim") or hidden // heads),
        partial_rotary_factor=float(partial),
        rope_theta=float(theta),
        mrope_section=tuple(int(s) for s in section),
        max_position_embeddings=get("max_position_embeddings"),
        first_k_dense_replace=get("first_k_dense_replace"),
        n_routed_experts=get("n_routed_experts"),
        num_experts_per_tok=get("num_experts_per_tok"),
        n_shared_experts=get("n_shared_experts"),
        moe_intermediate_size=get("moe_intermediate_size"),
        routed_scaling_factor=get("routed_scaling_factor", float),
        n_group=int(tc.get("n_group") or 1),
        topk_group=int(tc.get("topk_group") or 1),
        norm_topk_prob=get("norm_topk_prob", bool),
        attention_bias=get("attention_bias", bool),
        rms_norm_eps=get("rms_norm_eps", float),
        tie_word_embeddings=bool(
            tc.get("tie_word_embeddings", top.get("tie_word_embeddings", False))
        ),
        eos_token_ids=eos_ids,
        pad_token_id=tc.get("pad_token_id", top.get("pad_token_id", d.pad_token_id)),
    )


def _parse_vision(vc: dict[str, Any]) -> VisionConfig:
    d = VisionConfig()
    kwargs = {}
    for name, default in asdict(d).items():
        value = vc.get(name, default)
        kwargs[name] = type(default)(value)
    return VisionConfig(**kwargs)


def _parse_quant(qc: dict[str, Any] | None) -> QuantConfig:
    if not qc:
        return QuantConfig()
    method = qc.get("quant_method")
    block = qc.get("weight_block_size")
    ignored = qc.get("ignore") or qc.get("modules_to_not_convert") or ()
    if method not in ("fp8", "compressed-tensors"):
        raise ConfigError(f"unsupported quantization method {method!r} (fp8, compressed-tensors)")
    return QuantConfig(
        method=method,
        weight_block_size=tuple(block) if block else None,
        ignored_modules=tuple(ignored),
    )
