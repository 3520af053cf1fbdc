"""Text and exact bytes of single token ids, for logprobs and for trimming stop tokens.

Contract: ``TokenText(tokenizer)`` answers ``text(id)`` (special tokens spelled out; a token that
is part of a multi-byte character decodes with U+FFFD) and ``bytes(id)`` (the token's exact
UTF-8 bytes: byte-level BPE symbols mapped back to bytes, added tokens as their UTF-8 text).
Results are cached per id. Works with a ``tokenizers.Tokenizer``.
Not here: incremental detokenization of whole outputs (the engine's detokenizer).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from decoder_service.engine.detokenizer import byte_level_bytes


class TokenText:
    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._added = set(tokenizer.get_added_tokens_decoder())
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)

    def _bytes(self, token_id: int) -> bytes:
        symbol = self._tok.id_to_token(token_id)
        if symbol is None:
            return b""
        if token_id in self._added:
            return self._text(token_id).encode("utf-8")
        return byte_level_bytes(symbol)  # the token's own UTF-8 outside the byte alphabet
