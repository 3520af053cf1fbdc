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


def _byte_level_alphabet() -> dict[str, int]:
    """Inverse of the byte-level BPE byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_FROM_SYMBOL = _byte_level_alphabet()


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
        if token_id in self._added or any(ch not in _FROM_SYMBOL for ch in symbol):
            return self._text(token_id).encode("utf-8")
        return bytes(_FROM_SYMBOL[ch] for ch in symbol)
