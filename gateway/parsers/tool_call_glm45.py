"""GLM-4.5 tool-call parser (`--tool-call-parser glm45`): `<tool_call>` blocks -> OpenAI tool_calls.

Format (glm4v_spec.md §5):
    <tool_call>NAME
    <arg_key>K</arg_key>
    <arg_value>V</arg_value>
    ...</tool_call>
- NAME is the block's text up to the first newline or `<arg_key>`, stripped; a block with an
  empty name is dropped. Arguments are the complete key/value pairs in order; anything else in
  the block is ignored. A block cut off by the end of the output keeps its complete pairs.
- V stays verbatim when the function's schema types the key as a string; otherwise it is read
  as JSON, then as a Python literal, and kept as a string when neither works.
- Arguments are a JSON object text: `{"k": v, "k2": v2}` (``json.dumps`` spacing).
- Content is the text outside blocks; whitespace touching a block is dropped (the model puts
  newlines around calls). With tool calls and no other text, content is None.
``parse_tool_calls`` handles a whole output; ``ToolCallStream`` produces the same content and
arguments for any split into deltas, emitting a call's name as soon as it is known and its
arguments one complete pair at a time.
Not here: reasoning (reasoning_glm45.py), choosing when to parse (streaming.py / routes).
"""

from __future__ import annotations

import ast
import json
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

from gateway.parsers.reasoning_glm45 import held_prefix_len

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
KEY_START, KEY_END = "<arg_key>", "</arg_key>"
VALUE_START, VALUE_END = "<arg_value>", "</arg_value>"
_MAX_LITERAL_CHARS = 10_000  # literal_eval on huge model output is a needless CPU risk

# function name -> its JSON-schema `properties` (key -> schema)
ToolSchemas = dict[str, dict[str, Any]]


def tool_schemas(tools: list[Any] | None) -> ToolSchemas:
    """Index request tools (schemas.ToolDef) by function name."""
    out: ToolSchemas = {}
    for tool in tools or []:
        params = tool.function.parameters or {}
        props = params.get("properties") if isinstance(params, dict) else None
        out[tool.function.name] = props if isinstance(props, dict) else {}
    return out


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # JSON object text


class ToolCallResult(NamedTuple):
    content: str | None
    tool_calls: list[ParsedToolCall]


# --- shared pieces -------------------------------------------------------------------------------


def _is_string_typed(schema: Any) -> bool:
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    kinds = [k for k in (kind if isinstance(kind, list) else [kind]) if k != "null"]
    return kinds == ["string"]


def convert_value(raw: str, schema: Any) -> Any:
    if _is_string_typed(schema):
        return raw
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        value = raw
        if len(raw) <= _MAX_LITERAL_CHARS:
            try:
                value = ast.literal_eval(raw.strip())
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                value = raw
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return raw  # e.g. a set, bytes or NaN: not representable in JSON arguments
    return value


def format_arg(key: str, value: Any, first: bool) -> str:
    """One `"key": value` piece of the arguments text; the pieces join to ``json.dumps``."""
    piece = f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}"
    return ("{" if first else ", ") + piece


def split_name(block: str) -> tuple[int, int] | None:
    """(end of name, start of body) once the name's terminator is in ``block``, else None."""
    ends = [i for i in (block.find("\n"), block.find(KEY_START)) if i >= 0]
    if not ends:
        return None
    end = min(ends)
    return end, end + 1 if block[end] == "\n" else end


def scan_pairs(body: str, pos: int, final: bool) -> tuple[list[tuple[str, str]], int]:
    """Complete key/value pairs in ``body`` from ``pos``; returns them and the resume position.

    A decision is only taken once the text that decides it is present, so scanning a prefix and
    then the whole body commits exactly the pairs a single scan of the whole body would.
    """
    pairs: list[tuple[str, str]] = []
    while True:
        k = body.find(KEY_START, pos)
        if k < 0:
            return pairs, pos
        ke = body.find(KEY_END, k + len(KEY_START))
        if ke < 0:
            return pairs, pos
        v = ke + len(KEY_END)
        while v < len(body) and body[v].isspace():
            v += 1
        if not body.startswith(VALUE_START, v):
            if not final and VALUE_START.startswith(body[v:]):
                return pairs, pos  # maybe the value tag is still arriving
            pos = v  # a key without a value: skip it
            continue
        ve = body.find(VALUE_END, v + len(VALUE_START))
        if ve < 0:
            return pairs, pos
        pairs.append((body[k + len(KEY_START) : ke], body[v + len(VALUE_START) : ve]))
        pos = ve + len(VALUE_END)


# --- whole output ---------------------------------------------------------------------------------


def parse_tool_calls(text: str, schemas: ToolSchemas) -> ToolCallResult:
    segments: list[str] = []
    calls: list[ParsedToolCall] = []
    pos, after_block = 0, False
    while True:
        start = text.find(CALL_START, pos)
        seg = text[pos:] if start < 0 else text[pos:start]
        seg = seg.lstrip() if after_block else seg
        if start < 0:
            segments.append(seg)
            break
        segments.append(seg.rstrip())
        end = text.find(CALL_END, start)
        block_end = len(text) if end < 0 else end
        block = text[start + len(CALL_START) : block_end]
        call = _parse_block(block, schemas)
        if call is not None:
            calls.append(call)
        pos, after_block = (len(text) if end < 0 else end + len(CALL_END)), True
    content = "".join(segments)
    return ToolCallResult(None if calls and not content else content, calls)


def _parse_block(block: str, schemas: ToolSchemas) -> ParsedToolCall | None:
    split = split_name(block)
    name_end, body_start = split if split is not None else (len(block), len(block))
    name = block[:name_end].strip()
    if not name:
        return None
    props = schemas.get(name, {})
    pairs, _ = scan_pairs(block[body_start:], 0, final=True)
    pieces = [
        format_arg(k, convert_value(v, props.get(k)), i == 0) for i, (k, v) in enumerate(pairs)
    ]
    return ParsedToolCall(new_call_id(), name, "".join(pieces) + "}" if pieces else "{}")


# --- streaming -------------------------------------------------------------------------------------


class ToolCallDeltaPart(NamedTuple):
    index: int
    id: str | None  # set on a call's first delta (with its name)
    name: str | None
    arguments: str


class ToolStreamDelta(NamedTuple):
    content: str
    calls: list[ToolCallDeltaPart]


@dataclass
class _Block:
    text: str = ""  # everything after <tool_call> seen so far
    name: str | None = None
    body_start: int = 0
    pos: int = 0  # scan resume position within the body
    n_args: int = 0
    dropped: bool = False


class ToolCallStream:
    """Incremental ``parse_tool_calls``: feed content deltas, then call ``finish()`` once."""

    def __init__(self, schemas: ToolSchemas) -> None:
        self.schemas = schemas
        self.calls_emitted = 0
        self._buf = ""  # content not yet emitted (held whitespace or a partial <tool_call>)
        self._after_block = False  # drop whitespace until the next non-space character
        self._block: _Block | None = None
        self._out: list[ToolCallDeltaPart] = []

    def feed(self, delta: str) -> ToolStreamDelta:
        content: list[str] = []
        if self._block is not None:
            self._block.text += delta
        else:
            self._buf += delta
        while True:
            if self._block is None:
                if not self._text_step(content):
                    break
            elif not self._block_step(final=False):
                break
        out, self._out = self._out, []
        return ToolStreamDelta("".join(content), out)

    def finish(self) -> ToolStreamDelta:
        content = ""
        if self._block is not None:
            self._block_step(final=True)
        else:
            content = self._buf.lstrip() if self._after_block else self._buf
            self._buf = ""
        out, self._out = self._out, []
        return ToolStreamDelta(content, out)

    def _text_step(self, content: list[str]) -> bool:
        if self._after_block:
            self._buf = self._buf.lstrip()
            self._after_block = not self._buf
        idx = self._buf.find(CALL_START)
        if idx >= 0:
            content.append(self._buf[:idx].rstrip())
            self._block = _Block(text=self._buf[idx + len(CALL_START) :])
            self._buf = ""
            return True
        keep = held_prefix_len(self._buf, CALL_START)
        ready = self._buf[: len(self._buf) - keep]
        emit = ready.rstrip()  # trailing whitespace waits: a call may follow
        content.append(emit)
        self._buf = self._buf[len(emit) :]
        return False

    def _block_step(self, final: bool) -> bool:
        """Advance the open block; True when it closed (the rest of its text goes back to _buf)."""
        block = self._block
        assert block is not None
        end = block.text.find(CALL_END)
        closed = end >= 0 or final
        text = block.text if end < 0 else block.text[:end]
        if block.name is None and not block.dropped:
            split = split_name(text)
            if split is None and not closed:
                return False
            name_end, block.body_start = split if split is not None else (len(text), len(text))
            block.name = text[:name_end].strip()
            block.dropped = not block.name
            if not block.dropped:
                self._out.append(
                    ToolCallDeltaPart(self.calls_emitted, new_call_id(), block.name, "")
                )
        if not block.dropped:
            props = self.schemas.get(block.name or "", {})
            pairs, block.pos = scan_pairs(text[block.body_start :], block.pos, final=closed)
            for key, raw in pairs:
                piece = format_arg(key, convert_value(raw, props.get(key)), block.n_args == 0)
                self._out.append(ToolCallDeltaPart(self.calls_emitted, None, None, piece))
                block.n_args += 1
        if not closed:
            return False
        if not block.dropped:
            closing = "}" if block.n_args else "{}"
            self._out.append(ToolCallDeltaPart(self.calls_emitted, None, None, closing))
            self.calls_emitted += 1
        self._buf = "" if end < 0 else block.text[end + len(CALL_END) :]
        self._block, self._after_block = None, True
        return True
