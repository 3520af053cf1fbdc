"""Write a GLM-4.5V-shaped checkpoint directory for benchmarks: real widths, few layers.

``python -m bench.scaled_checkpoint --out DIR [--layers 6] [--vision-depth 24]`` writes the tiny
checkpoint's tokenizer and template next to a ``config.json`` with the real GLM-4.5V text and
vision widths (hidden 4096, 96/8 heads, 128 experts top-8, vocab 151552) and the given depth, and
processor configs with the released checkpoints' pixel budgets (``REAL_IMAGE_SIZE``: up to 6,144
tokens an image), so a served benchmark's images cost what they cost on the real model. There are no weights: run it with ``--load-format dummy``. The tokenizer's BPE
vocabulary is padded with plain word pieces up to the real vocabulary size, so every token id that
random weights can sample decodes to text (a served benchmark then streams output like a real
checkpoint does); prompts still tokenize with the small vocabulary.
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
# preprocessor_config.json "size" of the released GLM-4.5V / 4.6V checkpoints (pixels of T*H*W,
# T = 2), and the video processor's class default
REAL_IMAGE_SIZE = {"shortest_edge": 12544, "longest_edge": 9633792}
REAL_VIDEO_SIZE = {"shortest_edge": 12544, "longest_edge": 28 * 28 * 2 * 30000}
REAL_VISION = {
    "hidden_size": VisionConfig.hidden_size,
    "num_heads": VisionConfig.num_heads,
    "image_size": VisionConfig.image_size,
    "intermediate_size": VisionConfig.intermediate_size,
    "out_hidden_size": VisionConfig.out_hidden_size,
}


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _filler(i: int) -> str:
    """A distinct byte-level BPE token spelling a space and a short word (``Ġ`` is the space)."""
    word = ""
    while True:
        i, r = divmod(i, len(LETTERS))
        word += LETTERS[r]
        if i == 0:
            return "\u0120w" + word


def pad_vocabulary(tokenizer_json: Path, vocab_size: int) -> None:
    """Give every id below ``vocab_size`` a token: the free ids join the BPE vocabulary."""
    tok = json.loads(tokenizer_json.read_text())
    vocab = tok["model"]["vocab"]
    # the special tokens keep their ids only if the model vocabulary holds them too: loading
    # gives an added token missing from it the next id past the vocabulary's size
    vocab.update({t["content"]: t["id"] for t in tok["added_tokens"]})
    taken = set(vocab.values())
    spellings = set(vocab)
    n = 0
    for token_id in range(vocab_size):
        if token_id in taken:
            continue
        while _filler(n) in spellings:
            n += 1
        vocab[_filler(n)] = token_id
        n += 1
    tokenizer_json.write_text(json.dumps(tok, ensure_ascii=False))


def write_scaled_checkpoint(out: Path, layers: int, vision_depth: int) -> Path:
    write_tiny_checkpoint(out, seed=0, variant="glm4.5v")
    (out / "model.safetensors").unlink()
    pad_vocabulary(out / "tokenizer.json", REAL_TEXT["vocab_size"])
    cfg = json.loads((out / "config.json").read_text())
    cfg["text_config"].update(REAL_TEXT, num_hidden_layers=layers)
    cfg["text_config"]["rope_scaling"]["mrope_section"] = list(TextConfig.mrope_section)
    cfg["vision_config"].update(REAL_VISION, depth=vision_depth)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name, size in (
        ("preprocessor_config.json", REAL_IMAGE_SIZE),
        ("video_preprocessor_config.json", REAL_VIDEO_SIZE),
    ):
        raw = json.loads((out / name).read_text())
        raw["size"] = dict(size)
        if "max_image_size" in raw:  # the video processor's cap on one frame
            raw["max_image_size"] = {"longest_edge": size["longest_edge"]}
        (out / name).write_text(json.dumps(raw, indent=2) + "\n")
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
