"""gRPC ``glimpse.decoder.v1.Decoder`` servicer: validate -> convert -> submit -> stream.

Contract: ``Generate`` converts the request (convert.py), prepares the prompt (chat: template +
encoders via media_dispatch.py; prompt: tokenized verbatim; token ids: as given), checks the
context budget, turns a thinking budget and a tool choice that requires a call into the engine's
``ForcedTokens`` (token ids from the checkpoint's tokenizer), submits to the ``EngineLoop`` and
streams ``GenerateResponse``s, starting the media fetch in the background once the request is
admitted. Every failure leaves as a gRPC
status with ``REASON[.PARAM]: message`` details (errors.py); nothing is reported inside OK
messages. Cancellation or a passed deadline reaches the handler as ``CancelledError``; the
``finally`` block aborts the engine request (freeing its KV blocks) and releases encoder work.
``Abort`` ends a request by id; ``GetModelInfo`` describes the model. Until the model is loaded
(``runtime()`` returns None) every call answers UNAVAILABLE.
Not here: model loading, health, metrics endpoints, shutdown (server.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import grpc

from decoder_service import convert
from decoder_service.engine.errors import InvalidRequestError
from decoder_service.engine.sampling_params import ForcedTokens
from decoder_service.engine_loop import EngineLoop, EngineRequest
from decoder_service.errors import (
    ServiceError,
    Status,
    from_engine_error,
    internal,
    invalid,
    invalid_parameter,
    queue_full,
    unavailable,
)
from decoder_service.inputs import GenerateInput
from decoder_service.media_dispatch import MediaDispatcher, PreparedPrompt
from decoder_service.metrics import DecoderMetrics, RequestTimer
from decoder_service.request_stream import RequestStream
from decoder_service.token_text import TokenText
from protos import decoder_pb2 as pb
from protos import decoder_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_CODES = {
    Status.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Status.EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Status.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Status.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    Status.INTERNAL: grpc.StatusCode.INTERNAL,
}


@dataclass
class Runtime:
    """Everything a call needs once the model is loaded."""

    loop: EngineLoop
    dispatcher: MediaDispatcher
    tokenizer: Any  # tokenizers.Tokenizer
    token_text: TokenText
    model: convert.ServedModel
    mm_timeout_s: float
    max_active: int  # running + waiting requests before queue_full
    kv_capacity: int  # tokens the whole KV pool holds (one request can never exceed it)
    metrics: DecoderMetrics | None


class DecoderServicer(pb_grpc.DecoderServicer):
    def __init__(self, runtime: Callable[[], Runtime | None]) -> None:
        self._runtime = runtime

    def _ready(self) -> Runtime:
        rt = self._runtime()
        if rt is None or rt.loop.dead:
            raise unavailable("the decoder is loading or stopping; retry shortly")
        return rt

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        rt = self._runtime()
        timer = RequestTimer(rt.metrics if rt else None)
        try:
            rt = self._ready()
            inp = convert.generate_input(request)
            async for chunk in self._generate(rt, inp, timer, context.time_remaining()):
                yield chunk
        except ServiceError as err:
            await _abort(context, err, timer)
        except InvalidRequestError as err:
            await _abort(context, from_engine_error(err), timer)

    async def _generate(
        self, rt: Runtime, inp: GenerateInput, timer: RequestTimer, remaining: float | None
    ) -> AsyncIterator[pb.GenerateResponse]:
        if rt.loop.num_active >= rt.max_active:
            raise queue_full("too many requests are queued; retry later")
        budget = rt.mm_timeout_s if remaining is None else min(rt.mm_timeout_s, remaining)
        deadline = time.monotonic() + budget
        forced = forced_tokens(rt.tokenizer, inp)  # before any encoder work: it may refuse
        prepared = await self._prompt(rt, inp, deadline)
        fetch: asyncio.Task[None] | None = None
        stream: RequestStream | None = None  # ours once admitted (an id in use is not ours)
        attached: set[int] = set()
        rid = inp.request_id
        try:
            params = replace(
                inp.sampling,
                max_tokens=self._max_tokens(rt, inp, prepared),
                forced=forced,
            )
            request = EngineRequest(
                rid,
                prepared.token_ids,
                params,
                prepared.mm_items,
                prepared.positions,
                prepared.rope_delta,
            )
            stream = await rt.loop.submit(request)
            timer.admitted()
            if prepared.pending:
                fetch = asyncio.create_task(self._fetch(rt, rid, prepared, attached, deadline))
                fetch.add_done_callback(lambda task: _fetch_crashed(task, rt, rid))
            while not stream.finished:
                chunk = await stream.next()
                if chunk.token_ids:
                    timer.tokens()
                if chunk.finish_reason is not None:
                    timer.finished(
                        chunk.finish_reason, chunk.prompt_tokens, chunk.completion_tokens
                    )
                yield convert.response(chunk, rt.token_text)
        finally:
            if stream is not None:
                if not stream.finished:  # cancelled or deadline: the engine aborts it
                    timer.finished("abort", len(prepared.token_ids), 0)
                rt.loop.release(rid)
            if fetch is not None and not fetch.done():
                fetch.cancel()
            unfetched = [p for p in prepared.pending if p.index not in attached]
            if unfetched and (fetch is None or not fetch.done() or fetch.cancelled()):
                rt.dispatcher.release(unfetched)

    async def _prompt(self, rt: Runtime, inp: GenerateInput, deadline: float) -> PreparedPrompt:
        if inp.chat is not None:
            return await rt.dispatcher.prepare(inp.chat, deadline)
        if inp.prompt is not None:
            ids = rt.tokenizer.encode(inp.prompt, add_special_tokens=False).ids
            if not ids:
                raise invalid("invalid_prompt", "the prompt has no tokens")
        else:
            ids = list(inp.token_ids or [])
        return PreparedPrompt(ids, [], None, 0, [])

    @staticmethod
    def _max_tokens(rt: Runtime, inp: GenerateInput, prepared: PreparedPrompt) -> int:
        n, limit = len(prepared.token_ids), rt.model.max_model_len
        if n >= limit:
            raise invalid(
                "context_length_exceeded",
                f"the prompt has {n} tokens; the context length is {limit}",
            )
        if inp.max_tokens is None:
            # "the rest of the context", but never more than the KV pool could ever hold
            return max(1, min(limit, rt.kv_capacity) - n)
        if n + inp.max_tokens > limit:
            raise invalid(
                "max_tokens_exceeded",
                f"the prompt has {n} tokens and max_tokens is {inp.max_tokens}; together they "
                f"exceed the context length {limit}",
            )
        return inp.max_tokens

    async def _fetch(
        self,
        rt: Runtime,
        rid: str,
        prepared: PreparedPrompt,
        attached: set[int],
        deadline: float,
    ) -> None:
        def attach(index: int, embeds) -> None:
            attached.add(index)
            rt.loop.attach(rid, index, embeds)

        try:
            await rt.dispatcher.fetch(prepared, attach, deadline)
        except ServiceError as err:
            rt.loop.fail(rid, err)
            rt.dispatcher.release([p for p in prepared.pending if p.index not in attached])

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        try:
            rt = self._ready()
        except ServiceError as err:
            await _abort(context, err, None)
        found = rt.loop.is_active(request.request_id)
        if found:
            rt.loop.abort(request.request_id)
        return pb.AbortResponse(found=found)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        try:
            rt = self._ready()
        except ServiceError as err:
            await _abort(context, err, None)
        return convert.model_info(rt.model)


def forced_tokens(tokenizer: Any, inp: GenerateInput) -> ForcedTokens | None:
    """The engine's forcing policy for a thinking budget and a tool call the client requires
    (GLM format: `</think>` is followed by a newline; a call opens with `<tool_call>NAME\n`)."""
    chat = inp.chat
    choice = chat.tool_choice if chat is not None else "auto"
    if inp.thinking_budget is None and choice == "auto":
        return None
    think_start, think_end = tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>")
    if think_start is None or think_end is None:
        param = "thinking_budget" if inp.thinking_budget is not None else "tool_choice"
        raise invalid_parameter(param, "this model has no <think> and </think> tokens")
    call = ""
    if chat is not None and choice != "auto":  # "required" or "named"
        call = "<tool_call>" + (f"{chat.tool_name}\n" if choice == "named" else "")
    return ForcedTokens(
        think_start_id=think_start,
        think_end_id=think_end,
        thinking_budget=inp.thinking_budget,
        after_think_end=tuple(tokenizer.encode("\n", add_special_tokens=False).ids),
        after_reasoning=tuple(tokenizer.encode(call, add_special_tokens=False).ids) if call else (),
        turn_start_id=tokenizer.token_to_id("<|assistant|>"),
    )


def _fetch_crashed(task: asyncio.Task[None], rt: Runtime, rid: str) -> None:
    # ServiceErrors are handled inside the task; anything else is a bug that would otherwise
    # leave the request waiting for its media until the deadline.
    if task.cancelled() or task.exception() is None:
        return
    log.error("media fetch of %s crashed", rid, exc_info=task.exception())
    rt.loop.fail(rid, internal("fetching the vision embeddings failed"))


async def _abort(
    context: grpc.aio.ServicerContext, err: ServiceError, timer: RequestTimer | None
) -> NoReturn:
    code = _CODES[err.status]
    if err.status == Status.INTERNAL:
        log.error("internal error: %s", err.message)
    if timer is not None:
        timer.failed(code.name)
    await context.abort(code, err.details)
    raise AssertionError("context.abort returns only by raising")
