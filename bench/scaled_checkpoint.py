"""Write a GLM-4.5V-shaped checkpoint directory for benchmarks: real widths, few layers.

``python -m bench.scaled_checkpoint --out DIR [--layers 6] [--vision-depth 24]`` writes the tiny
checkpoint's tokenizer, template and processor configs next to a ``config.json`` with the real
GLM-4.5V text and vision widths (hidden 4096, 96/8 heads, 128 experts top-8, vocab 151552) and the
given depth. There are no weights: run it with ``--load-format dummy``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.glm4v.config import TextConfig, VisionConfig
from models.glm4v.tiny import write_tiny_checkpoint

REAL_TEXT = {
    "vocab_size": TextConfig.vocab_size,
    "hidden_size": TextConfig.hidden_size,
    "intermediate_size": TextConfig.intermediate_size,
    "num_attention_heads": TextConfig.num_attention_heads,
    "num_key_value_heads": TextConfig.num_key_value_heads,
    "head_dim": TextConfig.head_dim,
    "n_routed_experts": TextConfig.n_routed_experts,
    "num_experts_per_tok": TextConfig.num_experts_per_tok,
    "moe_intermediate_size": TextConfig.moe_intermediate_size,
    "max_position_embeddings": TextConfig.max_position_embeddings,
}
REAL_VISION = {
    "hidden_size": VisionConfig.hidden_size,
    "num_heads": VisionConfig.num_heads,
    "image_size": VisionConfig.image_size,
    "intermediate_size": VisionConfig.intermediate_size,
    "out_hidden_size": VisionConfig.out_hidden_size,
}


def write_scaled_checkpoint(out: Path, layers: int, vision_depth: int) -> Path:
    write_tiny_checkpoint(out, seed=0, variant="glm4.5v")
    (out / "model.safetensors").unlink()
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"].update(REAL_TEXT, num_hidden_layers=layers)
    cfg["text_config"]["rope_scaling"]["mrope_section"] = list(TextConfig.mrope_section)
    cfg["vision_config"].update(REAL_VISION, depth=vision_depth)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vision-depth", type=int, default=24)
    a = p.parse_args()
    print(write_scaled_checkpoint(a.out, a.layers, a.vision_depth))


if __name__ == "__main__":
    main()
