"""POST /v1/completions: a raw prompt (text or token ids, no chat template), whole or streamed.

Same lifecycle as chat (routes/chat.py) without output parsers: the text is returned as the
decoder produced it. Logprobs use the legacy layout (tokens, token_logprobs, top_logprobs,
text_offset).
Not here: chat templates (the decoder), chunk layout (streaming.py).
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway import convert, limits
from gateway.disconnect import ClientDisconnected, until_disconnect
from gateway.errors import DecoderError, from_decoder
from gateway.generation import Generation, collect, disconnected_response
from gateway.request_body import parse_request, read_json_object
from gateway.responses import Completion, CompletionChoice
from gateway.schemas import CompletionRequest
from gateway.state import get_state
from gateway.streaming import (
    ChunkHead,
    EventStreamResponse,
    completion_chunks,
    dump_completion_chunk,
    legacy_logprobs,
    sse_events,
)

router = APIRouter(prefix="/v1")
INPUT_PARAM = "prompt"


@router.post("/completions")
async def create_completion(request: Request) -> Response:
    state = get_state(request)
    body = await read_json_object(request, state.config.max_payload_bytes)
    req = parse_request(CompletionRequest, body)
    model, info = await state.resolve_model(req.model)
    limits.check_completion(req, info)
    head = ChunkHead(f"cmpl-{uuid.uuid4().hex}", int(time.time()), model)
    gen = Generation.start(state, convert.completion_request(req, head.id))
    if req.stream:
        return await _stream(request, gen, req, head)
    try:
        out = await until_disconnect(request, collect(gen.stream))
    except ClientDisconnected:
        gen.close(disconnected=True)
        return disconnected_response()
    except DecoderError as exc:
        raise from_decoder(exc, INPUT_PARAM) from None
    finally:
        gen.close()
    logprobs = legacy_logprobs(out.logprobs, 0) if req.logprobs is not None else None
    choice = CompletionChoice(text=out.text, logprobs=logprobs, finish_reason=out.finish_reason)
    result = Completion(
        id=head.id, created=head.created, model=model, choices=[choice], usage=out.usage
    )
    return JSONResponse(result.model_dump())


async def _stream(
    request: Request, gen: Generation, req: CompletionRequest, head: ChunkHead
) -> Response:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunks = completion_chunks(gen.stream, head, include_usage=include_usage)
    handed_off = False
    try:
        first = await until_disconnect(request, anext(chunks))
        events = sse_events(
            first, chunks, lambda c: dump_completion_chunk(c, include_usage), INPUT_PARAM
        )
        response = EventStreamResponse(events, lambda done: gen.close(disconnected=not done))
        handed_off = True
        return response
    except ClientDisconnected:
        gen.close(disconnected=True)
        return disconnected_response()
    except DecoderError as exc:
        raise from_decoder(exc, INPUT_PARAM) from None
    finally:
        if not handed_off:
            gen.close()
