"""Bad requests get the right HTTP status and an OpenAI error object, and the gateway stays up.

Rows follow the bad-input table of RELIABILITY.md §1.3 (1-5, 8-17, 25-26, 30-32); each request
is sent raw with httpx so malformed bodies reach the server as written.
"""

from __future__ import annotations

import httpx
import pytest
from fake_decoder import MAX_IMAGES, MAX_MODEL_LEN, MODEL, VOCAB

PNG_URL = "data:image/png;base64,iVBORw0KGgo="


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


def user(*parts) -> dict:
    return chat(messages=[{"role": "user", "content": list(parts)}])


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def tool(parameters) -> dict:
    return {"type": "function", "function": {"name": "f", "parameters": parameters}}


# (case id, JSON body, expected status, expected param; "*" = any param)
JSON_CASES = [
    ("body-is-array", [chat()], 400, None),
    ("body-is-string", "hello", 400, None),
    ("missing-messages", {"model": MODEL}, 400, "messages"),
    ("empty-messages", chat(messages=[]), 400, "messages"),
    ("unknown-model", chat(model="gpt-9"), 404, "model"),
    ("max-tokens-over-context", chat(max_tokens=MAX_MODEL_LEN + 1), 400, "max_tokens"),
    ("max-tokens-zero", chat(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-negative", chat(max_tokens=-5), 400, "max_tokens"),
    ("max-tokens-string", chat(max_tokens="ten"), 400, "max_tokens"),
    ("max-tokens-absurd", chat(max_tokens=1e12), 400, "max_tokens"),
    ("max-completion-tokens-zero", chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("temperature-negative", chat(temperature=-0.1), 400, "temperature"),
    ("temperature-too-high", chat(temperature=2.5), 400, "temperature"),
    ("temperature-string", chat(temperature="hot"), 400, "temperature"),
    ("top-p-zero", chat(top_p=0), 400, "top_p"),
    ("top-p-above-one", chat(top_p=1.5), 400, "top_p"),
    ("top-k-below-minus-one", chat(top_k=-2), 400, "top_k"),
    ("min-p-above-one", chat(min_p=1.5), 400, "min_p"),
    ("presence-penalty", chat(presence_penalty=3), 400, "presence_penalty"),
    ("repetition-penalty-zero", chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("n-two", chat(n=2), 400, "n"),
    ("n-huge", chat(n=10**9), 400, "n"),
    ("logit-bias-bad-key", chat(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("logit-bias-out-of-range", chat(logit_bias={"5": 500}), 400, "logit_bias"),
    ("stop-five", chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("stop-token-out-of-vocab", chat(stop_token_ids=[VOCAB]), 400, "stop_token_ids"),
    ("top-logprobs-without-logprobs", chat(top_logprobs=3), 400, "top_logprobs"),
    ("top-logprobs-too-many", chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("stream-options-without-stream", chat(stream_options={"include_usage": True}), 400, "*"),
    ("seed-not-int", chat(seed=1.5), 400, "seed"),
    (
        "enable-thinking-not-bool",
        chat(chat_template_kwargs={"enable_thinking": "yes"}),
        400,
        "chat_template_kwargs",
    ),
    ("bad-role", chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.[0].role"),
    ("user-without-content", chat(messages=[{"role": "user"}]), 400, "messages.[0]"),
    (
        "image-url-bare-string",
        user({"type": "image_url", "image_url": "http://x.org/a.png"}),
        400,
        "messages.[0].content.[0].image_url",
    ),
    (
        "unknown-part-type",
        user({"type": "audio_url", "audio_url": {"url": "x"}}),
        400,
        "messages.[0].content.[0].type",
    ),
    ("part-missing-payload", user({"type": "image_url"}), 400, "messages.[0].content.[0]"),
    (
        "content-wrong-type",
        chat(messages=[{"role": "user", "content": 42}]),
        400,
        "messages.[0].content",
    ),
    ("too-many-images", user(*[image(PNG_URL)] * (MAX_IMAGES + 1)), 400, "messages"),
    (
        "too-many-videos",
        user(*[{"type": "video_url", "video_url": {"url": "https://a.b/v.mp4"}}] * 2),
        400,
        "messages",
    ),
    (
        "data-url-not-base64",
        user(image("data:image/png,rawbytes")),
        400,
        "messages.[0].content.[0].image_url.url",
    ),
    (
        "data-url-bad-base64",
        user(image("data:image/png;base64,@@@@")),
        400,
        "messages.[0].content.[0].image_url.url",
    ),
    (
        "url-backslash-at",
        user(image("http://127.0.0.1\\@example.com/a.png")),
        400,
        "messages.[0].content.[0].image_url.url",
    ),
    (
        "url-userinfo",
        user(image("http://user:pw@example.com/a.png")),
        400,
        "messages.[0].content.[0].image_url.url",
    ),
    (
        "url-ftp",
        user(image("ftp://example.com/a.png")),
        400,
        "messages.[0].content.[0].image_url.url",
    ),
    (
        "url-gopher",
        user(image("gopher://example.com/a")),
        400,
        "messages.[0].content.[0].image_url.url",
    ),
    (
        "url-bad-port",
        user(image("http://example.com:99999/a.png")),
        400,
        "messages.[0].content.[0].image_url.url",
    ),
    (
        "file-url-relative",
        user(image("file://host/etc/passwd")),
        400,
        "messages.[0].content.[0].image_url.url",
    ),
    (
        "video-fps-zero",
        user({"type": "video_url", "video_url": {"url": "https://a.b/v.mp4", "fps": 0}}),
        400,
        "messages.[0].content.[0].video_url.fps",
    ),
    (
        "tool-schema-bad-type",
        chat(tools=[tool({"type": 123})]),
        400,
        "tools.[0].function.parameters",
    ),
    (
        "tool-schema-bad-pattern",
        chat(
            tools=[
                tool({"type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}})
            ]
        ),
        400,
        "tools.[0].function.parameters",
    ),
    ("tool-schema-not-object", chat(tools=[tool(["a"])]), 400, "tools.[0].function.parameters"),
    (
        "tool-bad-name",
        chat(tools=[{"type": "function", "function": {"name": "no spaces"}}]),
        400,
        "tools.[0].function.name",
    ),
    (
        "tool-choice-unknown-function",
        chat(
            tools=[tool({"type": "object"})],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
        400,
        "tool_choice",
    ),
    ("tool-choice-required-without-tools", chat(tool_choice="required"), 400, "tool_choice"),
    (
        "tool-choice-bad-string",
        chat(tools=[tool({"type": "object"})], tool_choice="always"),
        400,
        "tool_choice",
    ),
    (
        "json-schema-without-schema",
        chat(response_format={"type": "json_schema"}),
        400,
        "response_format",
    ),
]


def assert_openai_error(r: httpx.Response, status: int, param: str | None = "*") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param != "*":
        assert error["param"] == param
    return error


@pytest.mark.parametrize(
    ("body", "status", "param"), [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES]
)
def test_bad_chat_request(gateway, body, status, param):
    r = httpx.post(f"{gateway.v1}/chat/completions", json=body, timeout=30)
    error = assert_openai_error(r, status, param)
    if status == 404:
        assert error["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("raw", "content_type", "status"),
    [
        (b'{"model": "x", "messages": [', "application/json", 400),
        (b"not json at all", "application/json", 400),
        (
            b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
            "application/json",
            400,
        ),
        (b"", "application/json", 400),
        (b"model=x&messages=hi", "application/x-www-form-urlencoded", 415),
    ],
    ids=["truncated", "garbage", "nan-literal", "empty", "form-encoded"],
)
def test_unparseable_body(gateway, raw, content_type, status):
    r = httpx.post(
        f"{gateway.v1}/chat/completions",
        content=raw,
        headers={"content-type": content_type},
        timeout=30,
    )
    assert_openai_error(r, status, None)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "prompt": ""}, "prompt"),
        ({"model": MODEL, "prompt": [1, VOCAB]}, "prompt"),
        ({"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
        ({"model": MODEL, "prompt": "x", "echo": True}, "echo"),
        ({"model": MODEL, "prompt": "x", "best_of": 3}, "best_of"),
        ({"model": MODEL, "prompt": "x", "logprobs": 6}, "logprobs"),
        ({"model": MODEL}, "prompt"),
    ],
    ids=["empty", "token-out-of-vocab", "batch", "echo", "best-of", "logprobs-too-many", "missing"],
)
def test_bad_completion_request(gateway, body, param):
    r = httpx.post(f"{gateway.v1}/completions", json=body, timeout=30)
    assert_openai_error(r, 400, param)


def test_body_over_the_payload_cap_is_413(gateway):
    big = "A" * (3 * 1024 * 1024)  # the fixture's cap is 2 MiB
    r = httpx.post(
        f"{gateway.v1}/chat/completions",
        json=user(image(f"data:image/png;base64,{big}")),
        timeout=30,
    )
    assert_openai_error(r, 413, None)

    def chunks():  # no Content-Length: the cap must hold while streaming the body in
        yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(3):
            yield b"B" * (1024 * 1024)
        yield b'"}]}'

    r = httpx.post(f"{gateway.v1}/chat/completions", content=chunks(), timeout=30)
    assert_openai_error(r, 413, None)


def test_huge_header_is_refused_without_harm(gateway):
    # The server answers 400 and closes while the client may still be writing, so a reset
    # connection is an equally valid refusal; what matters is no 5xx and no lasting harm.
    try:
        r = httpx.get(f"{gateway.v1}/models", headers={"x-filler": "h" * (256 * 1024)}, timeout=30)
        assert 400 <= r.status_code < 500
    except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
        pass
    assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 200


def test_unknown_route_and_method_are_openai_errors(gateway):
    assert_openai_error(httpx.get(f"{gateway.v1}/nope", timeout=10), 404, None)
    assert_openai_error(httpx.get(f"{gateway.v1}/chat/completions", timeout=10), 405, None)
    assert_openai_error(httpx.get(f"{gateway.v1}/models/other-model", timeout=10), 404, "model")


def test_gateway_still_serves_after_bad_input(gateway):
    assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 200
    r = httpx.post(f"{gateway.v1}/chat/completions", json=chat(), timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_explicit_nulls_mean_defaults(gateway):
    body = chat(stream=None, n=None, logprobs=None, temperature=None, stop=None, tools=None)
    r = httpx.post(f"{gateway.v1}/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"
