"""One request's output stream, as the engine loop hands it to the coroutine serving the call.

Contract: ``StreamChunk`` is what the client is sent next (token ids, their text, logprobs; the
last one carries the finish reason and usage). ``RequestStream`` is filled by the engine loop on
the event loop thread (``put``) and drained by exactly one coroutine: ``next()`` waits for
output and returns everything available merged into one chunk, so a slow reader gets fewer,
larger messages instead of falling behind; a ``ServiceError`` put into the stream is raised
there. Not here: the engine, protobuf.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from decoder_service.engine.model_runner import TokenLogprobs
from decoder_service.errors import ServiceError


@dataclass
class StreamChunk:
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last chunk
    prompt_tokens: int = 0  # usage, set on the last chunk
    completion_tokens: int = 0
    cached_tokens: int = 0


class RequestStream:
    """The outputs of one request, consumed by exactly one coroutine."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[StreamChunk | ServiceError] = asyncio.Queue()
        self.finished = False

    def put(self, item: StreamChunk | ServiceError) -> None:
        self._queue.put_nowait(item)

    async def next(self) -> StreamChunk:
        """Everything produced since the last call, merged into one chunk (waits for one)."""
        items = [await self._queue.get()]
        while not self._queue.empty() and not _last(items[-1]):
            items.append(self._queue.get_nowait())
        for item in items:
            if isinstance(item, ServiceError):
                self.finished = True
                raise item
        merged = items[-1] if len(items) == 1 else _merge(items)
        self.finished = merged.finish_reason is not None
        return merged


def _last(item: StreamChunk | ServiceError) -> bool:
    return isinstance(item, ServiceError) or item.finish_reason is not None


def _merge(chunks: list[StreamChunk]) -> StreamChunk:
    last = chunks[-1]
    logprobs = [lp for c in chunks for lp in c.logprobs or ()]
    return StreamChunk(
        token_ids=[t for c in chunks for t in c.token_ids],
        text="".join(c.text for c in chunks),
        logprobs=logprobs or None,
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        cached_tokens=last.cached_tokens,
    )
