"""Bad input that reaches the decoder or an encoder (RELIABILITY.md §1.3) through the real system.

Each request must fail with the documented HTTP status and OpenAI error code, without leaking
exception text, and the system must keep serving: /health stays 200 and a normal request still
gets an answer.
"""

from __future__ import annotations

import httpx
import pytest
from e2e_media import data_url, draw_image, image_part, png_bytes, text_part, video_part
from e2e_processes import MAX_IMAGES, MAX_MODEL_LEN


def ask(parts: list[dict], **extra) -> dict:
    return {
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": 4,
        "temperature": 0,
        **extra,
    }


def image_url(i: int) -> str:
    return data_url(png_bytes(draw_image(900 + i)))


CASES = {
    "prompt longer than the context": (
        lambda media: ask([text_part("hello " * (2 * MAX_MODEL_LEN))]),
        400,
        "context_length_exceeded",
    ),
    "prompt plus max_tokens past the context": (
        lambda media: ask([text_part("hello")], max_tokens=MAX_MODEL_LEN),
        400,
        "context_length_exceeded",
    ),
    "too many images": (
        lambda media: ask([image_part(image_url(i)) for i in range(MAX_IMAGES + 1)]),
        400,
        "too_many_images",
    ),
    "bytes that are not an image": (
        lambda media: ask([image_part(data_url(b"\x89PNG\r\n\x1a\n garbage")), text_part("?")]),
        400,
        "invalid_image",
    ),
    "corrupt video": (
        lambda media: ask([video_part(data_url(b"\x00" * 64 + b"moov", "video/mp4"))]),
        400,
        "invalid_video",
    ),
    "loopback URL": (
        lambda media: ask([image_part("http://127.0.0.1:9/a.png"), text_part("?")]),
        400,
        "invalid_image",
    ),
    "cloud metadata URL": (
        lambda media: ask([image_part("http://169.254.169.254/latest/meta-data"), text_part("?")]),
        400,
        "invalid_image",
    ),
    "file outside the allowed directory": (
        lambda media: ask([image_part("file:///etc/hostname"), text_part("?")]),
        400,
        "invalid_image",
    ),
    "file escaping the allowed directory": (
        lambda media: ask([image_part(f"file://{media}/../../../etc/hostname")]),
        400,
        "invalid_image",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_its_status_and_the_server_stays_healthy(
    system, media_dir, model_name, case
):
    build, status, code = CASES[case]
    body = build(media_dir) | {"model": model_name}
    reply = httpx.post(f"{system.v1}/chat/completions", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code
    assert "Traceback" not in error["message"] and "0x" not in error["message"]
    assert httpx.get(f"{system.url}/health", timeout=5).status_code == 200
    ok = httpx.post(
        f"{system.v1}/chat/completions",
        json=ask([image_part(image_url(0)), text_part("Still there?")]) | {"model": model_name},
        timeout=60,
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["content"] is not None
