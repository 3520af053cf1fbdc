"""Reasoning and a tool call through the real decoder and gateway, streamed and not.

The served checkpoint is scripted (crafted_checkpoint.py) to answer any prompt greedily with
``<think>REASONING</think><tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>
</tool_call>`` and then end its turn, so the expected OpenAI fields are known without the
service: transformers' greedy generate confirms the script first. With thinking switched off the
script still reasons first, so a tool call at the very start shows that tool_choice "required"
was forced by the decoder; tool_choice "none" leaves the tools out of the prompt and the call
unparsed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_processes import System, start_text_pair, stop

REASONING, NAME, KEY, VALUE = "Checking weather", "get_weather", "city", "Paris"
PIECES = ["<think>", REASONING, "</think>", "<tool_call>", NAME, "<arg_key>", KEY, "</arg_key>"]
PIECES += ["<arg_value>", VALUE, "</arg_value>", "</tool_call>"]
END = "<|observation|>"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": NAME,
            "description": "Current weather of a city",
            "parameters": {
                "type": "object",
                "properties": {KEY: {"type": "string"}},
                "required": [KEY],
            },
        },
    }
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def scripted(tiny_ckpt_45: Path, tmp_path_factory) -> Iterator[tuple[System, list[int], Path]]:
    from crafted_checkpoint import write_scripted_checkpoint

    ckpt = tmp_path_factory.mktemp("scripted") / "ckpt"
    ids = write_scripted_checkpoint(tiny_ckpt_45, ckpt, PIECES, END)
    running = start_text_pair(ckpt, tmp_path_factory.mktemp("scripted_logs"))
    yield running, ids, ckpt
    stop(running)


def test_the_script_is_what_transformers_generates(scripted):
    from e2e_reference import HFReference

    _, ids, ckpt = scripted
    ref = HFReference(ckpt)
    out = ref.greedy([("text", MESSAGES[0]["content"])], len(ids) + 4)
    assert out.token_ids[:-1] == ids and out.stopped
    assert out.text == "".join(PIECES)


def test_tool_call_and_reasoning_non_streamed(scripted):
    from openai import OpenAI

    system, _, _ = scripted
    client = OpenAI(base_url=system.v1, api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, max_tokens=64, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert getattr(choice.message, "reasoning_content", None) == REASONING
    assert not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == NAME
    assert json.loads(call.function.arguments) == {KEY: VALUE}


def test_tool_call_and_reasoning_streamed(scripted):
    from openai import OpenAI

    system, _, _ = scripted
    client = OpenAI(base_url=system.v1, api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, tools=TOOLS, max_tokens=64, temperature=0, stream=True
    )
    reasoning, content, calls, finish = [], [], {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
        content.append(choice.delta.content or "")
        for tc in choice.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            if tc.function and tc.function.name:
                entry["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                entry["arguments"] += tc.function.arguments
    assert finish == "tool_calls"
    assert "".join(reasoning) == REASONING
    assert "".join(content).strip() == ""
    assert list(calls) == [0]
    assert calls[0]["name"] == NAME
    assert json.loads(calls[0]["arguments"]) == {KEY: VALUE}


def test_required_tool_call_is_forced_when_the_prompt_closed_thinking(scripted):
    from openai import OpenAI

    system, _, _ = scripted
    client = OpenAI(base_url=system.v1, api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    off = {"chat_template_kwargs": {"enable_thinking": False}}

    def ask(choice: str):
        return client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            tools=TOOLS,
            tool_choice=choice,
            max_tokens=64,
            temperature=0,
            extra_body=off,
        ).choices[0]

    # left to itself the script reasons first, although the prompt closed thinking ...
    assert getattr(ask("auto").message, "reasoning_content", None) == REASONING
    # ... "required" puts the call right at the start of the answer instead
    choice = ask("required")
    assert choice.finish_reason == "tool_calls"
    assert not getattr(choice.message, "reasoning_content", None)
    (call,) = choice.message.tool_calls
    assert call.function.name == NAME and json.loads(call.function.arguments) == {KEY: VALUE}


def test_required_tool_call_after_the_models_own_reasoning_streamed(scripted):
    from openai import OpenAI

    system, _, _ = scripted
    client = OpenAI(base_url=system.v1, api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=64,
        temperature=0,
        stream=True,
    )
    reasoning, names, arguments, finish = [], [], [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
        for tc in choice.delta.tool_calls or []:
            names.append(tc.function.name or "")
            arguments.append(tc.function.arguments or "")
    assert finish == "tool_calls" and "".join(reasoning) == REASONING
    assert "".join(names) == NAME and json.loads("".join(arguments)) == {KEY: VALUE}


def test_tool_choice_none_hides_the_tools_and_parses_no_call(scripted):
    from openai import OpenAI

    system, _, _ = scripted
    client = OpenAI(base_url=system.v1, api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    base = {"model": model, "messages": MESSAGES, "max_tokens": 64, "temperature": 0}
    reply = client.chat.completions.create(**base, tools=TOOLS, tool_choice="none")
    without_tools = client.chat.completions.create(**base)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content.startswith("<tool_call>" + NAME)  # the text, not a call
    # the tools were not rendered into the prompt
    assert reply.usage.prompt_tokens == without_tools.usage.prompt_tokens
