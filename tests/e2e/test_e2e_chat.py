"""Chat through the whole system with the official `openai` client, against transformers.

Every case asks the same question non-streamed and streamed: the answer must equal transformers'
greedy generate on the same checkpoint (split into reasoning and content by the same GLM rules
the gateway applies), the streamed deltas must concatenate to the non-streamed answer, and usage
must count the prompt as transformers' processor expands it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from e2e_media import data_url, draw_image, image_part, png_bytes, text_part, video_part
from PIL import Image

from gateway.parsers.reasoning_glm45 import parse_reasoning

MAX_TOKENS = 10


def case_parts(case: str, media_dir: Path) -> tuple[list[dict], list[tuple[str, object]]]:
    """(OpenAI content parts, the same content for the reference)."""
    if case == "text only":
        return [text_part("Say hello.")], [("text", "Say hello.")]
    if case == "one image as data URL":
        img = draw_image(7)
        return (
            [image_part(data_url(png_bytes(img))), text_part("What is in the picture?")],
            [("image", img), ("text", "What is in the picture?")],
        )
    if case == "three images, data URL and file paths":
        img = draw_image(8)
        files = [media_dir / "picture_0.png", media_dir / "picture_1.png"]
        parts = [image_part(data_url(png_bytes(img)))]
        parts += [image_part(f.as_uri()) for f in files]
        ref = [("image", img)] + [("image", Image.open(f).convert("RGB")) for f in files]
        return [*parts, text_part("Compare them.")], [*ref, ("text", "Compare them.")]
    if case == "video as data URL":
        clip = media_dir / "clip.mp4"
        url = data_url(clip.read_bytes(), "video/mp4")
        return (
            [video_part(url), text_part("What happens?")],
            [("video", clip), ("text", "What happens?")],
        )
    raise AssertionError(case)


CASES = ["text only", "one image as data URL", "three images, data URL and file paths"]
CASES.append("video as data URL")


@pytest.mark.parametrize("case", CASES)
def test_answers_equal_transformers_greedy_streamed_or_not(client, model_name, hf, media_dir, case):
    parts, ref_parts = case_parts(case, media_dir)
    expected = hf.greedy(ref_parts, MAX_TOKENS)
    want_reasoning, want_content = parse_reasoning(expected.text)
    messages = [{"role": "user", "content": parts}]

    reply = client.chat.completions.create(
        model=model_name, messages=messages, max_tokens=MAX_TOKENS, temperature=0
    )
    msg = reply.choices[0].message
    assert (msg.content or "") == want_content
    assert getattr(msg, "reasoning_content", None) == want_reasoning
    assert reply.choices[0].finish_reason == ("stop" if expected.stopped else "length")
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == len(expected.token_ids)

    stream = client.chat.completions.create(
        model=model_name,
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    content, reasoning, first, usage = [], [], None, None
    for chunk in stream:
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        piece = (delta.content or "") + (getattr(delta, "reasoning_content", None) or "")
        if first is None:
            first = piece
        content.append(delta.content or "")
        reasoning.append(getattr(delta, "reasoning_content", None) or "")
    assert first, "the first streamed chunk must carry text"
    assert "".join(content) == (msg.content or "")
    assert "".join(reasoning) == (want_reasoning or "")
    assert usage is not None and usage.prompt_tokens == expected.prompt_tokens
