"""GLM-4.5 reasoning and tool-call parsers on crafted model outputs, whole and streamed.

Expected values come from how each output was built (its reasoning, content and calls are
known), never from the parsers. Streaming is checked at every two-way split, character by
character, and at seeded random multi-way splits: the concatenated deltas must equal the parts.
"""

from __future__ import annotations

import json
import random

import pytest

from gateway.parsers.reasoning_glm45 import ReasoningStream, parse_reasoning
from gateway.parsers.tool_call_glm45 import ToolCallStream, parse_tool_calls

SCHEMAS = {
    "get_weather": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "run_code": {"code": {"type": "string"}, "options": {"type": "object"}},
}


def splits(text: str, seed: int = 0) -> list[list[str]]:
    """Two-way splits at every position, one char at a time, and 30 random multi-way splits."""
    out = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    out.append(list(text))
    rng = random.Random(seed)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(2, 12))))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


def stream_reasoning(pieces: list[str]) -> tuple[str, str]:
    parser, reasoning, content = ReasoningStream(), [], []
    for piece in pieces:
        delta = parser.feed(piece)
        reasoning.append(delta.reasoning)
        content.append(delta.content)
    tail = parser.finish()
    return "".join(reasoning) + tail.reasoning, "".join(content) + tail.content


def stream_tools(pieces: list[str]) -> tuple[str, list[tuple[str, str]], list[list[str]]]:
    """(content, [(name, arguments)], argument fragments per call in arrival order)."""
    parser, content = ToolCallStream(SCHEMAS), []
    names: dict[int, str] = {}
    fragments: dict[int, list[str]] = {}
    for delta in [parser.feed(p) for p in pieces] + [parser.finish()]:
        content.append(delta.content)
        for part in delta.calls:
            if part.name is not None:
                assert part.index not in names, "a call's name is sent once"
                assert part.id and part.id.startswith("call_")
                names[part.index] = part.name
            assert part.index in names, "arguments never arrive before the name"
            fragments.setdefault(part.index, []).append(part.arguments)
    calls = [(names[i], "".join(fragments[i])) for i in sorted(names)]
    return "".join(content), calls, [fragments[i] for i in sorted(names)]


# --- reasoning --------------------------------------------------------------------------------

REASONING_CASES = [
    # (output, expected reasoning, expected content)
    (
        "<think>Two plus two.\nIt is 4.</think>\nThe answer is 4.",
        "Two plus two.\nIt is 4.",
        "The answer is 4.",
    ),
    ("<think></think>\n\nJust content <b>bold</b>", "", "Just content <b>bold</b>"),
    ("<think>cut off while <thin", "cut off while <thin", ""),
    (
        "No thinking at all, a < b and </think> stays.",
        None,
        "No thinking at all, a < b and </think> stays.",
    ),
    ("lead <think>x</think>y <think>z</think>", "x", "lead y <think>z</think>"),
    ("ends with a partial tag <thi", None, "ends with a partial tag <thi"),
]


@pytest.mark.parametrize(("text", "reasoning", "content"), REASONING_CASES)
def test_reasoning_whole_output(text, reasoning, content):
    assert parse_reasoning(text) == (reasoning, content)


@pytest.mark.parametrize(("text", "reasoning", "content"), REASONING_CASES)
def test_reasoning_streamed_at_any_split(text, reasoning, content):
    for pieces in splits(text):
        assert stream_reasoning(pieces) == (reasoning or "", content), pieces


def test_reasoning_is_released_before_the_end():
    parser = ReasoningStream()
    assert parser.feed("<think>step one").reasoning == "step one"
    delta = parser.feed("</think>\nfinal")
    assert (delta.reasoning, delta.content) == ("", "final")


# --- tool calls --------------------------------------------------------------------------------


def block(name: str, args: list[tuple[str, str]]) -> str:
    body = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>\n" for k, v in args)
    return f"<tool_call>{name}\n{body}</tool_call>"


CODE = 'def f(x):\n    return x < 3 and "</arg" != x\n'
TOOL_CASES = [
    # (output, expected content, expected [(name, arguments dict)])
    (
        "Let me check.\n" + block("get_weather", [("city", "123"), ("days", "3")]),
        "Let me check.",
        [("get_weather", {"city": "123", "days": 3})],
    ),
    (
        block("get_weather", [("city", "北京"), ("days", "2")])
        + "\n"
        + block("run_code", [("code", CODE), ("options", "{'timeout': 5, 'gpu': False}")])
        + "\n",
        None,
        [
            ("get_weather", {"city": "北京", "days": 2}),
            ("run_code", {"code": CODE, "options": {"timeout": 5, "gpu": False}}),
        ],
    ),
    (
        block("unknown_fn", [("n", "[1, 2.5, null]"), ("word", "plain words"), ("flag", "true")]),
        None,
        [("unknown_fn", {"n": [1, 2.5, None], "word": "plain words", "flag": True})],
    ),
    (
        "Plain answer with  spaces\n and a <tool_ mention\n",
        "Plain answer with  spaces\n and a <tool_ mention\n",
        [],
    ),
    ("Calling now: " + block("no_args", []) + "  \n", "Calling now:", [("no_args", {})]),
    # Cut off by max_tokens inside the second argument: the complete pair survives.
    (
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n<arg_key>days</arg_key>\n<arg_va",
        None,
        [("get_weather", {"city": "Oslo"})],
    ),
    # A block without a name is dropped; the text around it stays content.
    ("a <tool_call>\n<arg_key>k</arg_key><arg_value>1</arg_value></tool_call> b", "ab", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), TOOL_CASES)
def test_tool_calls_whole_output(text, content, calls):
    result = parse_tool_calls(text, SCHEMAS)
    assert result.content == content
    assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == calls
    for call, (_, args) in zip(result.tool_calls, calls, strict=True):
        assert call.arguments == json.dumps(args, ensure_ascii=False)
        assert call.id.startswith("call_")
    assert len({c.id for c in result.tool_calls}) == len(calls)


@pytest.mark.parametrize(("text", "content", "calls"), TOOL_CASES)
def test_tool_calls_streamed_at_any_split(text, content, calls):
    expected = [(name, json.dumps(args, ensure_ascii=False)) for name, args in calls]
    for pieces in splits(text, seed=len(text)):
        got_content, got_calls, _ = stream_tools(pieces)
        assert got_content == (content or ""), pieces
        assert got_calls == expected, pieces


def test_string_typed_values_are_verbatim():
    text = block("get_weather", [("city", " 007 "), ("days", "7")])
    (call,) = parse_tool_calls(text, SCHEMAS).tool_calls
    assert json.loads(call.arguments) == {"city": " 007 ", "days": 7}


def test_tool_arguments_stream_one_pair_at_a_time():
    text = "Sure.\n" + block("get_weather", [("city", "Paris"), ("days", "3")])
    _, _, fragments = stream_tools(list(text))
    assert len(fragments[0]) == 4  # name (empty args), first pair, second pair, closing brace
    assert json.loads(fragments[0][1] + "}") == {"city": "Paris"}


def test_content_before_a_call_streams_before_the_call_ends():
    parser = ToolCallStream(SCHEMAS)
    assert parser.feed("Checking the weather").content == "Checking the weather"
    delta = parser.feed(" now.\n<tool_call>get_weather\n<arg_key>ci")
    assert delta.content == " now."
    assert [c.name for c in delta.calls] == ["get_weather"]
