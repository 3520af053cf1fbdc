"""The benchmark checkpoint's padded vocabulary: every id random weights can sample decodes to
text, the special tokens keep their ids, and prompts tokenize as with the small vocabulary."""

from __future__ import annotations

import json

from tokenizers import Tokenizer

from bench.scaled_checkpoint import REAL_TEXT, write_scaled_checkpoint
from models.glm4v.config import load_model_config
from models.glm4v.tiny import write_tiny_checkpoint


def test_padded_vocabulary_decodes_every_id_and_keeps_special_ids(tmp_path):
    small = Tokenizer.from_file(str(write_tiny_checkpoint(tmp_path / "tiny") / "tokenizer.json"))
    out = write_scaled_checkpoint(tmp_path / "scaled", layers=1, vision_depth=1)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    vocab = REAL_TEXT["vocab_size"]
    assert tok.get_vocab_size() == vocab == load_model_config(out).text.vocab_size
    for name in ("<|endoftext|>", "<|image|>", "<|video|>", "<|user|>", "</think>"):
        assert tok.token_to_id(name) == small.token_to_id(name)
    text = "describe <|image|> the red circle"
    assert tok.encode(text).ids == small.encode(text).ids
    specials = {t["id"] for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    for token_id in (small.get_vocab_size(), vocab // 2, vocab - 1):
        assert token_id not in specials
        assert tok.decode([token_id]).strip(), token_id  # a word, not an empty string
    spellings = {tok.id_to_token(i) for i in range(vocab)}
    assert len(spellings) == vocab  # one distinct token per id
