"""Decoder chunks -> OpenAI chunk objects -> Server-Sent Events.

Contract of a streamed answer:
- The first chunk carries the first real output (content, reasoning or a tool call, with
  `role: "assistant"`), never an empty or role-only delta; only an output with no text at all
  gets a single `{"role": "assistant", "content": ""}` chunk, the one with the finish reason.
- Deltas are the output parsers' increments, so concatenating them equals the non-streamed
  message; the finish reason comes in its own chunk (`tool_calls` when calls were parsed and the
  decoder stopped normally), then, with `stream_options.include_usage`, a `choices: []` chunk with
  usage.
- A decoder error after the 200 went out is sent as `data: {"error": {...}}`; every stream ends
  with `data: [DONE]`.
- ``EventStreamResponse`` runs ``on_close(finished)`` exactly once however the response ends, so
  the caller can cancel the gRPC call and release its admission slot on client disconnect.
Not here: choosing parsers or validating requests (routes/), the parsers themselves (parsers/).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import NamedTuple

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.convert import DecodedChunk
from gateway.errors import DecoderError, from_decoder
from gateway.generation import ended_early
from gateway.parsers.reasoning_glm45 import ReasoningStream
from gateway.parsers.tool_call_glm45 import ToolCallStream, ToolSchemas
from gateway.responses import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    FunctionCallDelta,
    TokenLogprob,
    ToolCallDelta,
)

DONE = b"data: [DONE]\n\n"


class ChunkHead(NamedTuple):
    """Fields repeated on every chunk of one response."""

    id: str
    created: int
    model: str


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"


# --- chat --------------------------------------------------------------------------------------


class ChatTextParser:
    """Streaming reasoning + tool-call parsing of one chat answer's text."""

    def __init__(self, reasoning: bool, tools: ToolSchemas | None) -> None:
        self._reasoning = ReasoningStream() if reasoning else None
        self._tools = ToolCallStream(tools) if tools is not None else None

    @property
    def calls_emitted(self) -> int:
        return self._tools.calls_emitted if self._tools is not None else 0

    def feed(self, text: str, final: bool) -> ChatDelta:
        reasoning, content = "", text
        if self._reasoning is not None:
            reasoning, content = self._reasoning.feed(text)
            if final:
                tail = self._reasoning.finish()
                reasoning, content = reasoning + tail.reasoning, content + tail.content
        calls: list[ToolCallDelta] = []
        if self._tools is not None:
            parts = [self._tools.feed(content)]
            if final:
                parts.append(self._tools.finish())
            content = "".join(p.content for p in parts)
            for part in (c for p in parts for c in p.calls):
                if calls and calls[-1].index == part.index and part.id is None:
                    calls[-1].function.arguments = (calls[-1].function.arguments or "") + (
                        part.arguments
                    )
                    continue
                calls.append(
                    ToolCallDelta(
                        index=part.index,
                        id=part.id,
                        type="function" if part.id else None,
                        function=FunctionCallDelta(name=part.name, arguments=part.arguments),
                    )
                )
        return ChatDelta(
            content=content or None, reasoning_content=reasoning or None, tool_calls=calls or None
        )


def dump_chat_chunk(chunk: ChatCompletionChunk, include_usage: bool) -> dict:
    out = chunk.model_dump(exclude={"choices"})
    out["choices"] = [
        {**c.model_dump(exclude={"delta"}), "delta": c.delta.model_dump(exclude_none=True)}
        for c in chunk.choices
    ]
    if not include_usage:
        out.pop("usage")
    return out


async def chat_chunks(
    decoded: AsyncIterable[DecodedChunk],
    parser: ChatTextParser,
    head: ChunkHead,
    *,
    include_usage: bool,
) -> AsyncIterator[ChatCompletionChunk]:
    first = True
    pending: list[TokenLogprob] = []

    def make(delta: ChatDelta, reason: str | None) -> ChatCompletionChunk:
        nonlocal first, pending
        if first:
            delta.role = "assistant"
            first = False
        logprobs = ChoiceLogprobs(content=pending) if pending else None
        pending = []
        choice = ChatChunkChoice(delta=delta, logprobs=logprobs, finish_reason=reason)
        return ChatCompletionChunk(
            id=head.id, created=head.created, model=head.model, choices=[choice]
        )

    async for chunk in decoded:
        pending.extend(chunk.logprobs)
        final = chunk.finish_reason is not None
        delta = parser.feed(chunk.text, final)
        if not delta.is_empty():
            yield make(delta, None)
        if not final:
            continue
        reason = chunk.finish_reason
        if parser.calls_emitted and reason == "stop":
            reason = "tool_calls"
        yield make(ChatDelta(content="") if first else ChatDelta(), reason)
        if include_usage and chunk.usage is not None:
            yield ChatCompletionChunk(
                id=head.id, created=head.created, model=head.model, choices=[], usage=chunk.usage
            )
        return
    raise ended_early()


# --- completions ----------------------------------------------------------------------------------


def legacy_logprobs(items: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """The /v1/completions logprobs layout; ``offset`` is the text length before these tokens."""
    out = CompletionLogprobs()
    for lp in items:
        out.tokens.append(lp.token)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({t.token: t.logprob for t in lp.top_logprobs})
        out.text_offset.append(offset)
        offset += len(lp.token)
    return out


async def completion_chunks(
    decoded: AsyncIterable[DecodedChunk], head: ChunkHead, *, include_usage: bool
) -> AsyncIterator[Completion]:
    sent_any, offset = False, 0
    pending: list[TokenLogprob] = []

    def make(text: str, reason: str | None) -> Completion:
        nonlocal sent_any, offset, pending
        logprobs = legacy_logprobs(pending, offset) if pending else None
        offset += sum(len(lp.token) for lp in pending)
        sent_any, pending = True, []
        choice = CompletionChoice(text=text, logprobs=logprobs, finish_reason=reason)
        return Completion(id=head.id, created=head.created, model=head.model, choices=[choice])

    async for chunk in decoded:
        pending.extend(chunk.logprobs)
        if chunk.text:
            yield make(chunk.text, None)
        if chunk.finish_reason is not None:
            yield make("", chunk.finish_reason)
            if include_usage and chunk.usage is not None:
                yield Completion(
                    id=head.id,
                    created=head.created,
                    model=head.model,
                    choices=[],
                    usage=chunk.usage,
                )
            return
    raise ended_early()


def dump_completion_chunk(chunk: Completion, include_usage: bool) -> dict:
    out = chunk.model_dump()
    if not include_usage:
        out.pop("usage")
    return out


# --- SSE response ---------------------------------------------------------------------------------


async def sse_events(
    first: BaseModel,
    rest: AsyncIterator[BaseModel],
    dump: Callable[[BaseModel], dict],
    input_param: str,
) -> AsyncIterator[bytes]:
    yield sse(dump(first))
    try:
        async for item in rest:
            yield sse(dump(item))
    except DecoderError as exc:
        yield sse(from_decoder(exc, input_param).body())
    yield DONE


class EventStreamResponse(StreamingResponse):
    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[bool], None]) -> None:
        self._on_close = on_close
        self._finished = False
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(self._track(events), media_type="text/event-stream", headers=headers)

    async def _track(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for event in events:
            yield event
        self._finished = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # NOTE: on disconnect Starlette cancels the body task mid-await; the gRPC call is
            # cancelled here rather than left to garbage collection of the generators.
            self._on_close(self._finished)
