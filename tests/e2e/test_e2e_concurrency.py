"""32 concurrent streamed requests, each with its own image: no answer borrows from another.

Each streamed answer (all 32 in flight together, batched by the encoder and the decoder) must
equal the answer the same image gets when asked alone, afterwards.
"""

from __future__ import annotations

import asyncio

from e2e_media import data_url, draw_image, image_part, png_bytes, text_part

N = 32
MAX_TOKENS = 10


def messages(i: int) -> list[dict]:
    url = data_url(png_bytes(draw_image(500 + i, size=(64 + 4 * (i % 5), 56))))
    return [{"role": "user", "content": [image_part(url), text_part("Describe the image.")]}]


async def streamed(system, model: str) -> list[str]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=system.v1, api_key="none", max_retries=0, timeout=120)

    async def one(i: int) -> str:
        stream = await client.chat.completions.create(
            model=model, messages=messages(i), max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        parts = []
        async for chunk in stream:
            if chunk.choices:
                delta = chunk.choices[0].delta
                parts.append(
                    (getattr(delta, "reasoning_content", None) or "") + (delta.content or "")
                )
        return "".join(parts)

    try:
        return await asyncio.gather(*(one(i) for i in range(N)))
    finally:
        await client.close()


def test_concurrent_streams_equal_single_answers(system, client, model_name):
    together = asyncio.run(streamed(system, model_name))
    alone = []
    for i in range(N):
        reply = client.chat.completions.create(
            model=model_name, messages=messages(i), max_tokens=MAX_TOKENS, temperature=0
        )
        msg = reply.choices[0].message
        alone.append((getattr(msg, "reasoning_content", None) or "") + (msg.content or ""))
    assert together == alone
    assert len(set(alone)) > 1, "the images must change the answers for this test to mean much"
