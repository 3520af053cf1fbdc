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


def test_processor_budgets_are_the_released_checkpoints(tmp_path):
    from models.glm4v.processing.image import smart_resize
    from models.glm4v.processing.processor_config import load_processor_config

    out = write_scaled_checkpoint(tmp_path / "scaled", layers=1, vision_depth=1)
    image = load_processor_config(out).image
    assert (image.min_pixels, image.max_pixels) == (12544, 9633792)
    # a 12-megapixel photo is cut to the 6,144-token budget, not to the tiny checkpoint's 64
    h, w = smart_resize(2, 3024, 4032, 28, image.min_pixels, image.max_pixels, 2)
    tokens = (h // 28) * (w // 28)
    assert 5000 < tokens <= 6144
