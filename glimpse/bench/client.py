"""One streamed chat completion, timed: the client side of ``glimpse bench serve``.

Contract: ``send_chat_request`` POSTs one payload to an OpenAI-compatible
``/v1/chat/completions`` with ``stream: true`` and returns a ``RequestResult``; it never raises for
a server or network failure (HTTP status, connection error, malformed stream, timeout) but
returns ``ok=False`` with the reason, and it gives up after ``timeout_s`` so a stalled server
cannot hang a run. ``list_models`` reads ``GET /v1/models``.

Timing follows the usual serving-benchmark definitions: TTFT is the time from sending to the first
chunk that carries output (content, reasoning or a tool call; the role-only opening chunk does not
count); ITL are the gaps between consecutive output chunks (a chunk carrying several tokens is one
gap); output tokens come from the server's final ``usage`` when it sends one, else one per chunk.

Not here: payload contents (``dataset.py``), pacing and concurrency (``runner.py``), statistics.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    ok: bool = False
    start_s: float = 0.0  # perf_counter at send
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    output_chunks: int = 0
    output_tokens: int = 0
    # From the server's usage; None when it sent none (the runner then uses the dataset estimate).
    prompt_tokens: int | None = None
    usage_seen: bool = False
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None with fewer than two tokens."""
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def list_models(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> list[str]:
    resp = await client.get(f"{base_url.rstrip('/')}/v1/models", headers=auth_headers(api_key))
    resp.raise_for_status()
    return [m["id"] for m in resp.json().get("data", [])]


async def send_chat_request(
    client: httpx.AsyncClient,
    url: str,
    payload: dict,
    headers: dict[str, str],
    timeout_s: float,
) -> RequestResult:
    result = RequestResult(start_s=time.perf_counter())
    try:
        async with asyncio.timeout(timeout_s):
            await _stream(client, url, payload, headers, result)
    except TimeoutError:
        result.error = f"timed out after {timeout_s:g} s"
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    except (ValueError, TypeError, AttributeError) as exc:  # malformed JSON / chunk layout
        result.error = f"bad stream: {type(exc).__name__}: {exc}"
    result.e2e_s = time.perf_counter() - result.start_s
    if result.error:
        result.ok = False
        return result
    if result.output_chunks == 0:
        result.error = "stream ended without any output"
        return result
    if not result.usage_seen:
        result.output_tokens = result.output_chunks
    result.ok = True
    return result


async def _stream(
    client: httpx.AsyncClient, url: str, payload: dict, headers: dict, result: RequestResult
) -> None:
    async with client.stream("POST", url, json=payload, headers=headers) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode("utf-8", "replace")
            result.error = f"HTTP {resp.status_code}: {_error_message(body)}"
            return
        last = result.start_s
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, event names
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = f"error in stream: {_error_message(data)}"
                return
            now = time.perf_counter()
            if any(_has_output(choice.get("delta") or {}) for choice in chunk.get("choices") or []):
                if result.output_chunks == 0:
                    result.ttft_s = now - result.start_s
                else:
                    result.itl_s.append(now - last)
                last = now
                result.output_chunks += 1
            usage = chunk.get("usage")
            if usage:
                result.usage_seen = True
                result.output_tokens = int(usage.get("completion_tokens") or 0)
                if usage.get("prompt_tokens") is not None:
                    result.prompt_tokens = int(usage["prompt_tokens"])


def _has_output(delta: dict) -> bool:
    return bool(
        delta.get("content")
        or delta.get("reasoning_content")
        or delta.get("reasoning")
        or delta.get("tool_calls")
    )


def _error_message(body: str) -> str:
    """The OpenAI error object's message when the body is one, else the body itself (cut)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return body[:300]
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])[:300]
    return body[:300]
