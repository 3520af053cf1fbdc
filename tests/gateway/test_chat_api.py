"""The gateway answers the official `openai` client through a real process and a fake decoder.

Scripts in the fake decoder fix what the "model" writes; the tests check what a client sees:
streamed deltas concatenate to the non-streamed message, reasoning and tool calls come out in
OpenAI fields, usage and logprobs are reported, and every request parameter reaches the decoder.
"""

from __future__ import annotations

import base64
import io
import json

import grpc
import httpx
import openai
import pytest
from fake_decoder import MAX_MODEL_LEN, MODEL, Script
from PIL import Image

from protos import decoder_pb2 as pb

THINK_PIECES = ["<thi", "nk>Count", " the dots.</th", "ink>", "\n", "There are", " 3 dots."]
TOOL_TEXT = (
    "I'll look that up.\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
    "<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=30)


def chunked(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def ask(client: openai.OpenAI, key: str, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": key}], **kwargs
    )


def collect_stream(client: openai.OpenAI, key: str, **kwargs) -> dict:
    chunks = list(ask(client, key, stream=True, **kwargs))
    out = {"content": "", "reasoning": "", "calls": {}, "finish": None, "usage": None}
    out["chunks"] = chunks
    for chunk in chunks:
        if chunk.usage is not None:
            out["usage"] = chunk.usage
        for choice in chunk.choices:
            delta = choice.delta
            out["content"] += delta.content or ""
            out["reasoning"] += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or []:
                entry = out["calls"].setdefault(call.index, {"name": "", "arguments": ""})
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            out["finish"] = choice.finish_reason or out["finish"]
    return out


def test_text_stream_concatenates_to_non_stream(client, fake_decoder):
    fake_decoder.scripts["plain"] = Script(pieces=["The", " image", " shows", " a ", "cat", "."])
    whole = ask(client, "plain")
    streamed = collect_stream(client, "plain")
    assert whole.choices[0].message.content == "The image shows a cat."
    assert streamed["content"] == whole.choices[0].message.content
    assert whole.choices[0].finish_reason == streamed["finish"] == "stop"
    first = streamed["chunks"][0].choices[0].delta
    assert first.role == "assistant" and first.content == "The"
    for chunk in streamed["chunks"][:-1]:
        delta = chunk.choices[0].delta
        assert delta.content, "no empty or role-only chunk before the finish chunk"


def test_reasoning_is_split_streamed_and_not(client, fake_decoder):
    fake_decoder.scripts["think"] = Script(pieces=THINK_PIECES)
    message = ask(client, "think").choices[0].message
    assert message.reasoning_content == "Count the dots."
    assert message.content == "There are 3 dots."
    streamed = collect_stream(client, "think")
    assert (streamed["reasoning"], streamed["content"]) == ("Count the dots.", "There are 3 dots.")
    first = streamed["chunks"][0].choices[0].delta
    assert first.role == "assistant" and first.reasoning_content == "Count"


@pytest.mark.parametrize("piece_size", [1, 7, 1000])
def test_tool_calls_are_parsed_streamed_and_not(client, fake_decoder, piece_size):
    key = f"weather-{piece_size}"
    fake_decoder.scripts[key] = Script(pieces=chunked(TOOL_TEXT, piece_size))
    choice = ask(client, key, tools=TOOLS).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I'll look that up."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}

    streamed = collect_stream(client, key, tools=TOOLS)
    assert streamed["finish"] == "tool_calls"
    assert streamed["content"] == "I'll look that up."
    assert streamed["calls"] == {0: {"name": "get_weather", "arguments": call.function.arguments}}
    sent = fake_decoder.requests[key]
    assert sent.sampling.skip_special_tokens is False  # the parser needs the tags in the text
    assert [t.name for t in sent.chat.tools] == ["get_weather"]
    assert json.loads(sent.chat.tools[0].parameters_json) == TOOLS[0]["function"]["parameters"]


def test_tool_choice_none_leaves_text_alone(client, fake_decoder):
    fake_decoder.scripts["no-tools"] = Script(pieces=[TOOL_TEXT])
    choice = ask(client, "no-tools", tools=TOOLS, tool_choice="none").choices[0]
    assert choice.message.content == TOOL_TEXT
    assert not choice.message.tool_calls and choice.finish_reason == "stop"
    assert fake_decoder.requests["no-tools"].chat.tool_choice.mode == pb.ToolChoice.NONE


def test_usage_with_cached_tokens(client, fake_decoder):
    fake_decoder.scripts["usage"] = Script(pieces=["a", "b", "c"], cached_tokens=7)
    usage = ask(client, "usage").usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len("usage") + 10, 3)
    assert usage.total_tokens == usage.prompt_tokens + 3
    assert usage.prompt_tokens_details.cached_tokens == 7
    streamed = collect_stream(client, "usage", stream_options={"include_usage": True})
    assert streamed["usage"] == usage
    assert streamed["chunks"][-1].choices == []
    no_usage = collect_stream(client, "usage")
    assert no_usage["usage"] is None


def test_logprobs_follow_the_tokens(client, fake_decoder):
    pieces = ["Red", ",", " green"]
    fake_decoder.scripts["lp"] = Script(pieces=pieces)
    lps = ask(client, "lp", logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert [lp.token for lp in lps] == pieces
    assert [[t.token for t in lp.top_logprobs] for lp in lps] == [
        [f"{p}#0", f"{p}#1"] for p in pieces
    ]
    assert bytes(lps[0].bytes) == b"Red"
    streamed = collect_stream(client, "lp", logprobs=True, top_logprobs=2)
    tokens = [
        lp.token
        for c in streamed["chunks"]
        for ch in c.choices
        for lp in (ch.logprobs.content if ch.logprobs else [])
    ]
    assert tokens == pieces


def _png_bytes() -> bytes:
    image = Image.new("RGB", (32, 24), (200, 30, 40))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_every_parameter_reaches_the_decoder(client, fake_decoder):
    png = _png_bytes()
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                {"type": "video_url", "video_url": {"url": "file:///media/clip.mp4", "fps": 2}},
                {"type": "text", "text": "params"},
            ],
        },
    ]
    client.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0.3,
        top_p=0.9,
        max_completion_tokens=77,
        seed=1234,
        stop=["END", "STOP"],
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        extra_body={
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "stop_token_ids": [151336],
            "chat_template_kwargs": {"enable_thinking": False},
            "thinking_budget": 64,
        },
    )
    sent = fake_decoder.requests["params"]
    s = sent.sampling
    assert s.temperature == pytest.approx(0.3) and s.top_p == pytest.approx(0.9)
    assert (s.top_k, s.max_tokens, s.seed, s.thinking_budget) == (20, 77, 1234, 64)
    assert s.min_p == pytest.approx(0.05) and s.repetition_penalty == pytest.approx(1.1)
    assert s.presence_penalty == pytest.approx(0.5)
    assert s.frequency_penalty == pytest.approx(-0.5)
    assert list(s.stop) == ["END", "STOP"] and list(s.stop_token_ids) == [151336]
    assert sent.chat.enable_thinking is False
    assert sent.chat.tool_choice.mode == pb.ToolChoice.NAMED
    assert sent.chat.tool_choice.function_name == "get_weather"
    assert [m.role for m in sent.chat.messages] == ["system", "user"]
    parts = sent.chat.messages[1].content
    assert parts[0].image.data == png and parts[0].image.mime_type == "image/png"
    assert parts[1].image.url == "https://example.com/a.jpg"
    assert parts[2].video.url == "file:///media/clip.mp4" and parts[2].video.fps == 2
    assert not parts[2].video.HasField("max_frames")
    assert parts[3].text == "params"


def test_unset_parameters_stay_unset(client, fake_decoder):
    ask(client, "defaults")
    s = fake_decoder.requests["defaults"].sampling
    for name in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed", "thinking_budget"):
        assert not s.HasField(name), name
    assert not fake_decoder.requests["defaults"].chat.HasField("enable_thinking")


def test_completions_raw_prompt_and_token_ids(client, fake_decoder):
    fake_decoder.scripts["Once upon a time"] = Script(pieces=[" there", " was", " a", " fox"])
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    assert whole.choices[0].text == " there was a fox"
    assert fake_decoder.requests["Once upon a time"].sampling.max_tokens == 5
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == " there was a fox"
    client.completions.create(model=MODEL, prompt=[11, 22, 33])
    assert list(fake_decoder.requests["token_ids"].token_ids.ids) == [11, 22, 33]


def test_models_lists_the_served_model(client, gateway):
    (card,) = client.models.list().data
    assert card.id == MODEL
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{gateway.v1}/models").json()["data"][0]["max_model_len"] == MAX_MODEL_LEN


DECODER_ERRORS = [
    # (status code, details, HTTP status, OpenAI code, param)
    (
        grpc.StatusCode.INVALID_ARGUMENT,
        "context_length_exceeded: prompt has 9000 tokens",
        400,
        "context_length_exceeded",
        "messages",
    ),
    (
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_tokens_exceeded: 4000 + 500 > 4096",
        400,
        "context_length_exceeded",
        "max_tokens",
    ),
    (
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_image: image could not be decoded",
        400,
        "invalid_image",
        "image_url",
    ),
    (
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_parameter.top_k: must be >= -1",
        400,
        "invalid_value",
        "top_k",
    ),
    (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "queue_full: 512 requests waiting",
        429,
        "rate_limit_exceeded",
        None,
    ),
    (grpc.StatusCode.UNAVAILABLE, "draining", 503, "decoder_unavailable", None),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline", 504, "timeout", None),
    (grpc.StatusCode.INTERNAL, "Traceback: /secret/path.py line 3", 500, "internal_error", None),
]


@pytest.mark.parametrize(("code", "details", "status", "err_code", "param"), DECODER_ERRORS)
@pytest.mark.parametrize("stream", [False, True])
def test_decoder_errors_before_output_are_http_errors(
    gateway, fake_decoder, code, details, status, err_code, param, stream
):
    key = f"err-{code.name}-{stream}-{status}-{err_code}"
    fake_decoder.scripts[key] = Script(error=(code, details), error_after=0)
    body = {"model": MODEL, "messages": [{"role": "user", "content": key}], "stream": stream}
    r = httpx.post(f"{gateway.v1}/chat/completions", json=body, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (err_code, param)
    assert "secret" not in r.text and "Traceback" not in r.text
    if status in (429, 503):
        assert r.headers["retry-after"]
    assert httpx.get(f"{gateway.url}/health").status_code == 200


def test_error_mid_stream_is_an_sse_error_then_done(gateway, fake_decoder):
    fake_decoder.scripts["mid"] = Script(
        pieces=["one", " two", " three"], error=(grpc.StatusCode.INTERNAL, "boom"), error_after=2
    )
    body = {"model": MODEL, "messages": [{"role": "user", "content": "mid"}], "stream": True}
    r = httpx.post(f"{gateway.v1}/chat/completions", json=body, timeout=30)
    assert r.status_code == 200
    events = [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in payloads[:-1]) == "one two"
    assert payloads[-1]["error"]["type"] == "server_error"
    assert "boom" not in payloads[-1]["error"]["message"]
    with pytest.raises(openai.APIError):
        list(
            ask(openai.OpenAI(base_url=gateway.v1, api_key="x", max_retries=0), "mid", stream=True)
        )
