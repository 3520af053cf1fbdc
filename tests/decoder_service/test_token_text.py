"""Single-token text and exact bytes (``TokenText``), used for logprobs and stop trimming.

Expected bytes come from the text itself: the bytes of the tokens of an encoded string must
concatenate to that string's UTF-8, also where a character is split across tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from decoder_service.token_text import TokenText

TEXTS = ["Hello there, world!", "naïve café 東京タワー 🦊🚀", "  spaces\tand\nnewlines  "]


@pytest.fixture(scope="module")
def tok(tiny_ckpt_45: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_ckpt_45 / "tokenizer.json"))


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_concatenate_to_the_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False).ids
    token_text = TokenText(tok)
    assert b"".join(token_text.bytes(i) for i in ids) == text.encode("utf-8")


def test_a_token_inside_a_character_has_its_bytes_and_a_replacement_text(tok: Tokenizer) -> None:
    token_text = TokenText(tok)
    ids = tok.encode("🦊", add_special_tokens=False).ids
    assert len(ids) > 1  # the tiny vocabulary splits the emoji's four bytes
    assert b"".join(token_text.bytes(i) for i in ids) == "🦊".encode()
    assert "\ufffd" in token_text.text(ids[0])


def test_special_tokens_are_spelled_out(tok: Tokenizer) -> None:
    token_text = TokenText(tok)
    for token_id, added in tok.get_added_tokens_decoder().items():
        assert token_text.text(token_id) == added.content
        assert token_text.bytes(token_id) == added.content.encode("utf-8")
