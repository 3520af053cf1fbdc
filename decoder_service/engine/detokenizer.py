"""Incremental detokenization with stop strings.

Contract: one ``IncrementalDetokenizer`` per request. ``push(token_ids)`` returns the text that
may be shown now. Text is only released once it is complete: a token that ends in the middle of
a multi-byte character (the tokenizer decodes it to U+FFFD) is held until the character is
whole, so the concatenation of all pieces equals decoding all tokens at once. When ``stop``
strings are set, text that could still turn out to be the start of a stop string is held back,
and once a stop string appears the text is cut before it (``stop_string`` says which); nothing
of the stop string is ever released. ``flush()`` releases what is held when the request ends
for another reason. Works with a ``tokenizers.Tokenizer`` or a transformers fast tokenizer.
The text itself is kept only when there are stop strings to search it for, and then only its
tail that a later stop string could still start in (released text before the last
``max(len(stop)) - 1`` characters is dropped), so a push costs O(new text), not O(output).

Two sources of new text, releasing the same pieces. ``_DecodeWindow`` asks the tokenizer to
decode a sliding window of ids each push (any decoder); ``single_texts`` lets many of them of
one tokenizer and one ``skip_special_tokens`` setting share the decodes of single ids (a step's
decode window is usually the one token released last step). ``_ByteStream`` is used when a
``TokenBytes`` table is passed (``TokenBytes.of`` builds one only for a decoder that is exactly
``ByteLevel``, as GLM-4.5V/4.6V's is): a token is its fixed byte string, so a push is a table
look-up and an incremental UTF-8 decode, with no tokenizer call.

Why the two agree: the window starts where text was last released, and text is released only
when its decode does not end in U+FFFD, so the window always starts on a character boundary and
its new text is ``lossy_utf8(bytes pushed since the last release)``; ``_ByteStream`` keeps those
bytes' decode (its unfinished character as bytes) and releases under the same condition.
CPython's UTF-8 ``replace`` and Rust's ``from_utf8_lossy`` both replace maximal invalid
subparts, one U+FFFD each (tests/decoder_service/test_detokenizer.py checks this).

Not here: stop token ids and finishing requests (the scheduler and the engine).
"""

from __future__ import annotations

import codecs
from typing import Any

from tokenizers import decoders

_REPLACEMENT = "\ufffd"
_TRIM_AT = 1024  # characters of dead text that make ``_trim`` copy the live tail
_utf8_decode = codecs.utf_8_decode


def backend_tokenizer(tokenizer: Any) -> Any:
    """The raw ``tokenizers.Tokenizer`` behind a transformers tokenizer (decode without clean-up)."""
    return (
        getattr(tokenizer, "backend_tokenizer", None)
        or getattr(tokenizer, "_tokenizer", None)
        or tokenizer
    )


def _byte_level_translation() -> dict[int, int]:
    """``str.translate`` table taking ByteLevel's printable stand-in characters to the bytes
    they stand for (as latin-1 characters); every other character below 256 goes to U+FFFF so
    that encoding to latin-1 fails, as for any character outside the alphabet."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    rest = [b for b in range(256) if b not in printable]
    table = {c: 0xFFFF for c in range(256)}
    table.update({b: b for b in printable})
    table.update({256 + n: b for n, b in enumerate(rest)})  # GPT-2's bytes_to_unicode
    return table


_BYTE_LEVEL = _byte_level_translation()


def byte_level_bytes(token: str) -> bytes:
    """What the ByteLevel decoder makes of one token: its characters mapped back to bytes, or
    the token's own UTF-8 when any character is outside the byte alphabet."""
    try:
        return token.translate(_BYTE_LEVEL).encode("latin-1")
    except UnicodeEncodeError:
        return token.encode("utf-8")


class TokenBytes:
    """The byte string each token id decodes to, for a tokenizer whose decoder is ByteLevel.

    Filled lazily, one ``id_to_token`` per id the first time any request meets it (the real
    vocabulary has ~151k ids; a request sees a few hundred). The tokenizer must not gain tokens
    afterwards."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok
        # skip_special_tokens drops every id whose token is a special token's content
        added = tok.get_added_tokens_decoder().values()
        self._special = {t.content for t in added if t.special}
        self.kept: dict[int, bytes] = {}  # id -> its bytes
        self.skipped: dict[int, bytes] = {}  # the same, b"" for special tokens

    @classmethod
    def of(cls, tokenizer: Any) -> TokenBytes | None:
        """A table for ``tokenizer``, or None unless its decoder is exactly ByteLevel."""
        tok = backend_tokenizer(tokenizer)
        if type(getattr(tok, "decoder", None)) is not decoders.ByteLevel:
            return None
        return cls(tok)

    def fill(self, token_id: int, skip: bool) -> bytes:
        """Look ``token_id`` up (an unknown id is nothing, as decode skips it) and keep it."""
        token = self._tok.id_to_token(token_id)  # OverflowError for non-u32 ids, like decode
        kept = b"" if token is None else byte_level_bytes(token)
        skipped = b"" if token in self._special else kept
        self.kept[token_id], self.skipped[token_id] = kept, skipped
        return skipped if skip else kept


class _DecodeWindow:
    """New complete text by decoding ``ids[prefix:]`` against ``ids[prefix:read]``."""

    def __init__(self, tok: Any, skip: bool, single_texts: dict[int, str] | None) -> None:
        self._tok = tok
        self._skip = skip
        self._single = single_texts
        self._ids: list[int] = []
        self._prefix_offset = 0  # decode window start (context for the next piece)
        self._read_offset = 0  # tokens up to here are already released (or held back)
        self._window: str | None = ""  # decode of ids[prefix:read]; None = not decoded yet

    def _decode(self, ids: list[int]) -> str:
        single = self._single
        if single is not None and len(ids) == 1:
            text = single.get(ids[0])
            if text is None:
                text = single[ids[0]] = self._tok.decode(ids, skip_special_tokens=self._skip)
            return text
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_ids: list[int]) -> str | None:
        """The text completed by ``token_ids``, or None while it is unfinished or empty."""
        ids = self._ids
        ids += token_ids
        prefix, read = self._prefix_offset, self._read_offset
        before = self._window
        if before is None:  # the window's text changes only when text is released
            before = self._window = self._decode(ids[prefix:read])
        after = self._decode(ids[prefix:])
        if len(after) <= len(before) or after.endswith(_REPLACEMENT):
            return None
        self._prefix_offset, self._read_offset, self._window = read, len(ids), None
        return after[len(before) :]

    def flush(self) -> str:
        if self._read_offset == len(self._ids):
            return ""
        # Trailing bytes of an unfinished character: show them as they decode.
        whole = self._decode(self._ids[self._prefix_offset :])
        head = self._decode(self._ids[self._prefix_offset : self._read_offset])
        self._read_offset, self._window = len(self._ids), None
        return whole[len(head) :]


class _ByteStream:
    """New complete text from the tokens' bytes: O(new tokens), no tokenizer call."""

    def __init__(self, token_bytes: TokenBytes, skip: bool) -> None:
        self._bytes = token_bytes
        self._skip = skip
        self._table = token_bytes.skipped if skip else token_bytes.kept
        self._unfinished = b""  # trailing bytes that may still become a character
        self._held: list[str] = []  # decoded since the last release

    def push(self, token_ids: list[int]) -> str | None:
        table, skip, fill = self._table, self._skip, self._bytes.fill
        data = b"".join([table[i] if i in table else fill(i, skip) for i in token_ids])
        if self._unfinished:
            data = self._unfinished + data
        text, used = _utf8_decode(data, "replace", False)
        self._unfinished = data[used:]
        held = self._held
        if text:
            held.append(text)
        # released once no character is left open and the text does not end in U+FFFD
        if self._unfinished or not held or held[-1][-1] == _REPLACEMENT:
            return None
        text = "".join(held)
        held.clear()
        return text

    def flush(self) -> str:
        text, _ = _utf8_decode(self._unfinished, "replace", True)
        text = "".join(self._held) + text
        self._held.clear()
        self._unfinished = b""
        return text


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        skip_special_tokens: bool = True,
        stop: tuple[str, ...] = (),
        single_texts: dict[int, str] | None = None,  # id -> its decode; bounded by the vocab
        token_bytes: TokenBytes | None = None,  # from TokenBytes.of(tokenizer): the fast path
    ) -> None:
        self._source = (
            _ByteStream(token_bytes, skip_special_tokens)
            if token_bytes is not None
            else _DecodeWindow(backend_tokenizer(tokenizer), skip_special_tokens, single_texts)
        )
        self._stop = tuple(stop)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        # with stop strings: the tail of the text decoded so far (cut at a stop string if one
        # matched); what came before it was released and no stop string can start there
        self._text = ""
        self._released = 0  # characters of ``_text`` handed out
        self.stop_string: str | None = None  # the stop string that matched, if any

    def push(self, token_ids: list[int]) -> str:
        """Add generated tokens; return the newly releasable text (may be empty)."""
        if self.stop_string is not None:
            return ""
        new_text = self._source.push(token_ids)
        if new_text is None:
            return "" if not self._stop else self._release(len(self._text) - self._held_back())
        if not self._stop:  # nothing to hold back: everything complete is released
            return new_text
        self._trim()
        searched_from = len(self._text)
        self._text += new_text
        if self._cut_at_stop(searched_from):
            return self._release(len(self._text))
        return self._release(len(self._text) - self._held_back())

    def _trim(self) -> None:
        """Drop released text that no stop string can start in any more: a match found later
        starts at or after ``len(_text) - max_stop + 1``, and held text is never released."""
        drop = min(self._released, len(self._text) - self._max_stop + 1)
        if drop >= _TRIM_AT:  # amortised: the copy happens once per _TRIM_AT characters
            self._text = self._text[drop:]
            self._released -= drop

    def flush(self) -> str:
        """Release everything still held (the request ended without a stop string)."""
        tail = self._source.flush() if self.stop_string is None else ""
        if not self._stop:
            return tail
        self._text += tail
        return self._release(len(self._text))

    def _cut_at_stop(self, searched_from: int) -> bool:
        start = max(0, searched_from - self._max_stop + 1)
        best = None
        for s in self._stop:
            i = self._text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return False
        self._text = self._text[: best[0]]
        self.stop_string = best[1]
        return True

    def _held_back(self) -> int:
        """Length of the longest tail of ``_text`` that is a proper prefix of a stop string."""
        tail_max = min(self._max_stop - 1, len(self._text) - self._released)
        for n in range(tail_max, 0, -1):
            tail = self._text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                return n
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self._released)
        piece = self._text[self._released : upto]
        self._released = upto
        return piece
