"""A checkpoint whose greedy output is a fixed text: reasoning followed by a GLM tool call.

``write_scripted_checkpoint(src, dst, pieces, end)`` copies the tiny checkpoint ``src`` and
rewrites its text weights into a bigram machine: attention and MLP outputs are zeroed, so the
last hidden state is the current token's embedding; every token of the script gets its own
one-hot embedding direction and ``lm_head`` maps direction i to the script's token i + 1 (any
token outside the script maps to the first one, the last to ``end``). Greedy decoding after any
prompt therefore emits exactly ``pieces`` (tokenized piece by piece) and then ``end``. The script
must not repeat a token. The vision weights are untouched.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

_ZEROED = ("self_attn.o_proj.weight", "down_proj.weight")
_LOGIT = 10.0


def script_ids(tokenizer: Tokenizer, pieces: list[str]) -> list[int]:
    ids = [t for p in pieces for t in tokenizer.encode(p, add_special_tokens=False).ids]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the script repeats a token: {pieces}")
    return ids


def write_scripted_checkpoint(src: Path, dst: Path, pieces: list[str], end: str) -> list[int]:
    """Returns the script's token ids (without ``end``)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    ids = script_ids(tokenizer, pieces)
    end_id = tokenizer.token_to_id(end)
    weights = load_file(str(src / "model.safetensors"))
    embed = weights["model.language_model.embed_tokens.weight"]
    vocab, hidden = embed.shape
    start = len(ids)  # the direction of every token outside the script
    if start >= hidden:
        raise ValueError(f"script of {len(ids)} tokens needs hidden size > {len(ids)}")
    for name in weights:
        if name.startswith("model.language_model.layers.") and name.endswith(_ZEROED):
            weights[name] = torch.zeros_like(weights[name])
    new_embed = torch.zeros(vocab, hidden, dtype=embed.dtype)
    new_embed[:, start] = 1.0
    lm_head = torch.zeros_like(weights["lm_head.weight"])
    for i, token in enumerate(ids):
        new_embed[token] = 0.0
        new_embed[token, i] = 1.0
    lm_head[ids[0], start] = _LOGIT
    for i, token in enumerate(ids[1:]):
        lm_head[token, i] = _LOGIT
    lm_head[end_id, len(ids) - 1] = _LOGIT
    weights["model.language_model.embed_tokens.weight"] = new_embed
    weights["model.language_model.norm.weight"] = torch.ones(hidden, dtype=embed.dtype)
    weights["lm_head.weight"] = lm_head
    save_file(weights, str(dst / "model.safetensors"), {"format": "pt"})
    return ids
