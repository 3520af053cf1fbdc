"""GLM-4.5 reasoning parser (`--reasoning-parser glm45`): split `<think>…</think>` from content.

Rules (glm4v_spec.md §5, made consistent between whole-text and streaming):
- Text before the first `<think>` is content; text after it is reasoning until the first
  `</think>` (or the end of the output, when generation stopped while thinking).
- After `</think>`, everything is content, with the newlines the template puts right after the
  tag dropped. Later `<think>` tags are plain content.
- Without a `<think>` tag the whole output is content and `reasoning` is None.
``parse_reasoning`` handles a whole output; ``ReasoningStream`` gives the same split for any way
the output is cut into deltas (a tag split across deltas is held back until it resolves).
Not here: tool calls (tool_call_glm45.py), token ids (the gateway parses text only).
"""

from __future__ import annotations

from typing import NamedTuple

THINK_START = "<think>"
THINK_END = "</think>"


class ReasoningSplit(NamedTuple):
    reasoning: str | None  # None: the output had no <think> block
    content: str


def parse_reasoning(text: str) -> ReasoningSplit:
    start = text.find(THINK_START)
    if start < 0:
        return ReasoningSplit(None, text)
    before, rest = text[:start], text[start + len(THINK_START) :]
    end = rest.find(THINK_END)
    if end < 0:
        return ReasoningSplit(rest, before)
    after = rest[end + len(THINK_END) :].lstrip("\n")
    return ReasoningSplit(rest[:end], before + after)


def held_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ReasoningDelta(NamedTuple):
    reasoning: str
    content: str


class ReasoningStream:
    """Incremental ``parse_reasoning``: feed text deltas, then call ``finish()`` once."""

    _BEFORE, _THINKING, _AFTER = range(3)

    def __init__(self) -> None:
        self._state = self._BEFORE
        self._buf = ""  # text not yet assigned (a possible partial tag)
        self._strip_newlines = False  # right after </think>
        self.saw_think = False

    def feed(self, delta: str) -> ReasoningDelta:
        self._buf += delta
        reasoning, content = [], []
        while self._buf:
            if self._state == self._BEFORE:
                if not self._scan(THINK_START, content, self._THINKING):
                    break
                self.saw_think = True
            elif self._state == self._THINKING:
                if not self._scan(THINK_END, reasoning, self._AFTER):
                    break
                self._strip_newlines = True
            else:
                if self._strip_newlines:
                    self._buf = self._buf.lstrip("\n")
                    self._strip_newlines = not self._buf
                content.append(self._buf)
                self._buf = ""
        return ReasoningDelta("".join(reasoning), "".join(content))

    def _scan(self, tag: str, out: list[str], next_state: int) -> bool:
        """Move text before ``tag`` to ``out``; True when the tag was found and consumed."""
        idx = self._buf.find(tag)
        if idx >= 0:
            out.append(self._buf[:idx])
            self._buf = self._buf[idx + len(tag) :]
            self._state = next_state
            return True
        keep = held_prefix_len(self._buf, tag)
        out.append(self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep :]
        return False

    def finish(self) -> ReasoningDelta:
        """Flush a held partial tag: it was plain text after all."""
        rest, self._buf = self._buf, ""
        if self._state == self._THINKING:
            return ReasoningDelta(rest, "")
        return ReasoningDelta("", rest)
