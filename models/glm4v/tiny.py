"""``glimpse tiny-model``: a tiny random GLM-4.5V / GLM-4.6V checkpoint in Hugging Face format.

Contract: ``write_tiny_checkpoint(out_dir, seed, variant)`` writes a complete checkpoint directory
that transformers loads with ``AutoProcessor`` and ``Glm4vMoeForConditionalGeneration`` and that
Glimpse serves: ``config.json`` (the variant's own config format), ``model.safetensors`` with the
real checkpoint's tensor names (per-expert MoE weights, fp32 router bias), a project-built tokenizer
with every GLM special token, the chat template, generation config and image / video processor
configs with small pixel budgets. Weights come from a seeded ``torch.Generator``: the same seed
gives byte-identical files. The dimensions below are relied on by tests across the project.

Not here: the tokenizer corpus (``tokenizer_build.py``), model code, config parsing (``config.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from models.glm4v.tokenizer_build import EOS_TOKEN, STOP_TOKENS, write_tokenizer_files

VARIANTS = ("glm4.5v", "glm4.6v")
CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")

TEXT_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "partial_rotary_factor": 0.5,
    "max_position_embeddings": 4096,
    "first_k_dense_replace": 1,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "moe_intermediate_size": 32,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "attention_bias": True,
    "use_qk_norm": False,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_cache": True,
}
MROPE_SECTION = [2, 1, 1]  # sums to head_dim * partial_rotary_factor / 2 = 4

VISION_DIMS: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 32,
    "num_heads": 2,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
    "in_channels": 3,
    "image_size": 56,
    "intermediate_size": 128,
    "out_hidden_size": 64,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
}

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# Pixel budgets count 2 frames (the temporal patch) of 28x28 merge blocks: an image becomes
# between 4 and 64 LLM tokens, a whole video at most 64, so tests stay fast.
IMAGE_SIZE = {"shortest_edge": 2 * 28 * 28 * 4, "longest_edge": 2 * 28 * 28 * 64}
VIDEO_SIZE = {"shortest_edge": 2 * 28 * 28 * 2, "longest_edge": 2 * 28 * 28 * 64}

STD = 0.02
# Query/key projections get a larger scale so attention is far from uniform and position
# handling (M-RoPE, masks) visibly changes the outputs; same for the vision position table,
# which would otherwise vanish next to the normalised patch embeddings.
QK_STD = 0.1
VISION_POS_STD = 0.5
ROUTER_BIAS_STD = 0.05  # comparable to the spread of sigmoid scores, so it changes the choice


def build_config(variant: str, vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    """``config.json`` for ``variant``; ``ids`` maps special-token strings to tokenizer ids."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    eos_ids = [ids[t] for t in STOP_TOKENS]
    text: dict[str, Any] = {"model_type": "glm4v_moe_text", "vocab_size": vocab_size, **TEXT_DIMS}
    text |= {"eos_token_id": eos_ids, "pad_token_id": ids[EOS_TOKEN]}
    if variant == "glm4.5v":
        # transformers 4.5x layout: sections in rope_scaling, theta beside it.
        text |= {
            "rope_scaling": {"type": "default", "mrope_section": MROPE_SECTION},
            "rope_theta": 10000.0,
            "torch_dtype": "bfloat16",
        }
        top_extra = {"torch_dtype": "bfloat16", "transformers_version": "4.57.1"}
    else:
        text |= {
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 500000.0,
                "mrope_section": MROPE_SECTION,
                "partial_rotary_factor": TEXT_DIMS["partial_rotary_factor"],
            },
            "dtype": "bfloat16",
        }
        top_extra = {"dtype": "bfloat16", "transformers_version": "5.0.0"}
    return {
        "architectures": ["Glm4vMoeForConditionalGeneration"],
        "model_type": "glm4v_moe",
        "text_config": text,
        "vision_config": {"model_type": "glm4v_moe_vision", **VISION_DIMS},
        "image_token_id": ids["<|image|>"],
        "video_token_id": ids["<|video|>"],
        "image_start_token_id": ids["<|begin_of_image|>"],
        "image_end_token_id": ids["<|end_of_image|>"],
        "video_start_token_id": ids["<|begin_of_video|>"],
        "video_end_token_id": ids["<|end_of_video|>"],
        "tie_word_embeddings": False,
        **top_extra,
    }


def tensor_specs(vocab_size: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every checkpoint tensor, in the fixed order they are drawn."""
    t, v = TEXT_DIMS, VISION_DIMS
    h, hd = t["hidden_size"], t["head_dim"]
    q_dim, kv_dim = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    specs: list[tuple[str, tuple[int, ...], str]] = [
        ("lm_head.weight", (vocab_size, h), "matrix"),
        ("model.language_model.embed_tokens.weight", (vocab_size, h), "matrix"),
        ("model.language_model.norm.weight", (h,), "norm"),
    ]

    def mlp(prefix: str, inner: int, outer: int) -> None:
        specs.append((f"{prefix}.gate_proj.weight", (inner, outer), "matrix"))
        specs.append((f"{prefix}.up_proj.weight", (inner, outer), "matrix"))
        specs.append((f"{prefix}.down_proj.weight", (outer, inner), "matrix"))

    for i in range(t["num_hidden_layers"]):
        p = f"model.language_model.layers.{i}"
        specs += [
            (f"{p}.input_layernorm.weight", (h,), "norm"),
            (f"{p}.post_attention_layernorm.weight", (h,), "norm"),
            (f"{p}.self_attn.q_proj.weight", (q_dim, h), "qk"),
            (f"{p}.self_attn.q_proj.bias", (q_dim,), "bias"),
            (f"{p}.self_attn.k_proj.weight", (kv_dim, h), "qk"),
            (f"{p}.self_attn.k_proj.bias", (kv_dim,), "bias"),
            (f"{p}.self_attn.v_proj.weight", (kv_dim, h), "matrix"),
            (f"{p}.self_attn.v_proj.bias", (kv_dim,), "bias"),
            (f"{p}.self_attn.o_proj.weight", (h, q_dim), "matrix"),
        ]
        if i < t["first_k_dense_replace"]:
            mlp(f"{p}.mlp", t["intermediate_size"], h)
            continue
        n_exp, inner = t["n_routed_experts"], t["moe_intermediate_size"]
        specs.append((f"{p}.mlp.gate.weight", (n_exp, h), "matrix"))
        specs.append((f"{p}.mlp.gate.e_score_correction_bias", (n_exp,), "router_bias"))
        for e in range(n_exp):
            mlp(f"{p}.mlp.experts.{e}", inner, h)
        mlp(f"{p}.mlp.shared_experts", inner * t["n_shared_experts"], h)

    c, out = v["hidden_size"], v["out_hidden_size"]
    pt, ps, cin = v["temporal_patch_size"], v["patch_size"], v["in_channels"]
    n_pos = (v["image_size"] // ps) ** 2
    merge = v["spatial_merge_size"]
    specs += [
        ("model.visual.patch_embed.proj.weight", (c, cin, pt, ps, ps), "matrix"),
        ("model.visual.patch_embed.proj.bias", (c,), "bias"),
        ("model.visual.post_conv_layernorm.weight", (c,), "norm"),
        ("model.visual.embeddings.position_embedding.weight", (n_pos, c), "vision_pos"),
    ]
    for j in range(v["depth"]):
        p = f"model.visual.blocks.{j}"
        specs += [
            (f"{p}.norm1.weight", (c,), "norm"),
            (f"{p}.norm2.weight", (c,), "norm"),
            (f"{p}.attn.qkv.weight", (3 * c, c), "qk"),
            (f"{p}.attn.proj.weight", (c, c), "matrix"),
        ]
        mlp(f"{p}.mlp", out, c)  # the block MLP is out_hidden_size wide
    specs += [
        ("model.visual.post_layernorm.weight", (c,), "norm"),
        ("model.visual.downsample.weight", (out, c, merge, merge), "matrix"),
        ("model.visual.downsample.bias", (out,), "bias"),
        ("model.visual.merger.proj.weight", (out, out), "matrix"),
        ("model.visual.merger.post_projection_norm.weight", (out,), "norm"),
        ("model.visual.merger.post_projection_norm.bias", (out,), "bias"),
    ]
    mlp("model.visual.merger", v["intermediate_size"], out)
    return specs


def random_weights(vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random tensors for every spec: bf16, except the fp32 router correction bias."""
    gen = torch.Generator().manual_seed(seed)
    scale = {"matrix": STD, "qk": QK_STD, "bias": STD, "vision_pos": VISION_POS_STD}
    weights: dict[str, torch.Tensor] = {}
    for name, shape, kind in tensor_specs(vocab_size):
        x = torch.randn(shape, generator=gen, dtype=torch.float32)
        if kind == "norm":
            weights[name] = (1.0 + 0.1 * x).to(torch.bfloat16)  # near 1 so norms stay norms
        elif kind == "router_bias":
            weights[name] = (ROUTER_BIAS_STD * x).contiguous()  # kept in fp32 like the real ckpt
        else:
            weights[name] = (scale[kind] * x).to(torch.bfloat16)
    return weights


def _image_processor_config(variant: str) -> dict[str, Any]:
    processor = "Glm4vProcessor" if variant == "glm4.5v" else "Glm46VProcessor"
    return {
        "image_processor_type": "Glm4vImageProcessor",
        "processor_class": processor,
        "do_convert_rgb": True,
        "do_resize": True,
        "size": dict(IMAGE_SIZE),
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }


def _video_processor_config(variant: str) -> dict[str, Any]:
    cfg = _image_processor_config(variant)
    del cfg["image_processor_type"]
    name = "Glm4vVideoProcessor" if variant == "glm4.5v" else "Glm46VVideoProcessor"
    return {
        "video_processor_type": name,
        **cfg,
        "size": dict(VIDEO_SIZE),
        "max_image_size": {"longest_edge": VIDEO_SIZE["longest_edge"]},
        "do_sample_frames": True,
        "fps": 2,
        "max_duration": 300,
        "num_frames": 16,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _save_weights(out: Path, weights: dict[str, torch.Tensor], num_shards: int) -> None:
    """One ``model.safetensors``, or ``num_shards`` files plus the HF index that maps names."""
    if num_shards == 1:
        save_file(weights, str(out / "model.safetensors"), {"format": "pt"})
        return
    names = list(weights)
    per = -(-len(names) // num_shards)
    weight_map: dict[str, str] = {}
    for k in range(num_shards):
        fname = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {n: weights[n] for n in names[k * per : (k + 1) * per]}
        save_file(chunk, str(out / fname), {"format": "pt"})
        weight_map |= dict.fromkeys(chunk, fname)
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(out / "model.safetensors.index.json", index)


def write_tiny_checkpoint(
    out_dir: str | Path, seed: int = 0, variant: str = "glm4.5v", num_shards: int = 1
) -> Path:
    """Write the tiny checkpoint for ``variant`` ("glm4.5v" or "glm4.6v") into ``out_dir``.

    ``num_shards`` > 1 splits the weights over that many files with a
    ``model.safetensors.index.json``, like large real checkpoints.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    if not 1 <= num_shards <= 16:
        raise ValueError(f"num_shards must be in 1..16, got {num_shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = CHAT_TEMPLATE_PATH.read_text()
    tokenizer = write_tokenizer_files(out, template)
    (out / "chat_template.jinja").write_text(template)
    ids = tokenizer.get_vocab(with_added_tokens=True)
    vocab_size = -(-tokenizer.get_vocab_size(with_added_tokens=True) // 64) * 64  # round up

    config = build_config(variant, vocab_size, ids)
    _write_json(out / "config.json", config)
    stop_ids = [ids[t] for t in STOP_TOKENS]
    generation = {
        "_from_model_config": False,
        "do_sample": False,
        "eos_token_id": stop_ids,
        "pad_token_id": ids[EOS_TOKEN],
        "transformers_version": config["transformers_version"],
    }
    _write_json(out / "generation_config.json", generation)
    _write_json(out / "preprocessor_config.json", _image_processor_config(variant))
    _write_json(out / "video_preprocessor_config.json", _video_processor_config(variant))
    processor = _image_processor_config(variant)["processor_class"]
    _write_json(out / "processor_config.json", {"processor_class": processor})
    _save_weights(out, random_weights(vocab_size, seed), num_shards)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="directory to write")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (same seed, same bytes)")
    parser.add_argument("--variant", choices=VARIANTS, default="glm4.5v", help="config format")
    parser.add_argument("--shards", type=int, default=1, help="number of safetensors files")


def run(args: argparse.Namespace) -> int:
    path = write_tiny_checkpoint(args.out, args.seed, args.variant, num_shards=args.shards)
    print(f"wrote tiny {args.variant} checkpoint to {path}")
    return 0
