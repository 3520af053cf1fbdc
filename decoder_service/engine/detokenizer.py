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
``single_texts``
lets many detokenizers of one tokenizer and one ``skip_special_tokens`` setting share the decodes
of single ids (a step's decode window is usually the one token released last step).
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"
_TRIM_AT = 1024  # characters of dead text that make ``_trim`` copy the live tail


def backend_tokenizer(tokenizer: Any) -> Any:
    """The raw ``tokenizers.Tokenizer`` behind a transformers tokenizer (decode without clean-up)."""
    return (
        getattr(tokenizer, "backend_tokenizer", None)
        or getattr(tokenizer, "_tokenizer", None)
        or tokenizer
    )


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        skip_special_tokens: bool = True,
        stop: tuple[str, ...] = (),
        single_texts: dict[int, str] | None = None,  # id -> its decode; bounded by the vocab
    ) -> None:
        self._tok = backend_tokenizer(tokenizer)
        self._skip = skip_special_tokens
        self._single = single_texts
        self._stop = tuple(stop)
        self._max_stop = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._prefix_offset = 0  # decode window start (context for the next piece)
        self._read_offset = 0  # tokens up to here are already released (or held back)
        self._window: str | None = ""  # decode of ids[prefix:read]; None = not decoded yet
        # with stop strings: the tail of the text decoded so far (cut at a stop string if one
        # matched); what came before it was released and no stop string can start there
        self._text = ""
        self._released = 0  # characters of ``_text`` handed out
        self.stop_string: str | None = None  # the stop string that matched, if any

    def _decode(self, ids: list[int]) -> str:
        single = self._single
        if single is not None and len(ids) == 1:
            text = single.get(ids[0])
            if text is None:
                text = single[ids[0]] = self._tok.decode(ids, skip_special_tokens=self._skip)
            return text
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_ids: list[int]) -> str:
        """Add generated tokens; return the newly releasable text (may be empty)."""
        if self.stop_string is not None:
            return ""
        ids = self._ids
        ids += token_ids
        prefix, read = self._prefix_offset, self._read_offset
        before = self._window
        if before is None:  # the window's text changes only when text is released
            before = self._window = self._decode(ids[prefix:read])
        after = self._decode(ids[prefix:])
        if len(after) <= len(before) or after.endswith(_REPLACEMENT):
            return "" if not self._stop else self._release(len(self._text) - self._held_back())
        new_text = after[len(before) :]
        self._prefix_offset, self._read_offset, self._window = read, len(ids), None
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
        tail = ""
        if self.stop_string is None and self._read_offset < len(self._ids):
            # Trailing bytes of an unfinished character: show them as they decode.
            whole = self._decode(self._ids[self._prefix_offset :])
            head = self._decode(self._ids[self._prefix_offset : self._read_offset])
            tail = whole[len(head) :]
            self._read_offset, self._window = len(self._ids), None
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
