"""POST /v1/chat/completions: validate, call the decoder, answer whole or as an SSE stream.

Order of checks: API key (router dependency) -> body/JSON -> schema -> model name (404) ->
decoder reachable (503) -> model limits -> admission (429). Streaming waits for the first real
chunk before sending the 200, so errors the decoder reports up front (prompt too long, bad media)
are proper HTTP errors; later ones go into the stream. The client leaving at any point cancels
the gRPC call.
Not here: parsing rules (parsers/), chunk layout (streaming.py), protobuf (convert.py).
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway import convert, limits
from gateway.disconnect import ClientDisconnected, until_disconnect
from gateway.errors import DecoderError, from_decoder
from gateway.generation import Collected, Generation, collect, disconnected_response
from gateway.parsers.reasoning_glm45 import parse_reasoning
from gateway.parsers.tool_call_glm45 import ToolSchemas, parse_tool_calls, tool_schemas
from gateway.request_body import parse_request, read_json_object
from gateway.responses import (
    ChatChoice,
    ChatCompletion,
    ChatMessageOut,
    ChoiceLogprobs,
    FunctionCallOut,
    ToolCallOut,
)
from gateway.schemas import ChatCompletionRequest
from gateway.state import get_state
from gateway.streaming import (
    ChatTextParser,
    ChunkHead,
    EventStreamResponse,
    chat_chunks,
    dump_chat_chunk,
    sse_events,
)

router = APIRouter(prefix="/v1")
INPUT_PARAM = "messages"


@router.post("/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    state = get_state(request)
    cfg = state.config
    body = await read_json_object(request, cfg.max_payload_bytes)
    req = parse_request(ChatCompletionRequest, body)
    model, info = await state.resolve_model(req.model)
    limits.check_chat(req, info)
    parse_tools = bool(req.tools) and req.tool_choice != "none" and cfg.tool_call_parser
    schemas = tool_schemas(req.tools) if parse_tools else None
    reasoning = cfg.reasoning_parser is not None
    head = ChunkHead(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model)
    message = convert.chat_request(
        req, head.id, keep_special_tokens=reasoning or schemas is not None
    )
    gen = Generation.start(state, message)
    if req.stream:
        return await _stream(request, gen, req, ChatTextParser(reasoning, schemas), head)
    try:
        out = await until_disconnect(request, collect(gen.stream))
    except ClientDisconnected:
        gen.close(disconnected=True)
        return disconnected_response()
    except DecoderError as exc:
        raise from_decoder(exc, INPUT_PARAM) from None
    finally:
        gen.close()
    return JSONResponse(_completion(out, head, reasoning, schemas).model_dump())


def _completion(
    out: Collected, head: ChunkHead, reasoning: bool, schemas: ToolSchemas | None
) -> ChatCompletion:
    thought, content = parse_reasoning(out.text) if reasoning else (None, out.text)
    calls = []
    if schemas is not None:
        parsed = parse_tool_calls(content, schemas)
        content, calls = parsed.content, parsed.tool_calls
    reason = out.finish_reason
    if calls and reason == "stop":
        reason = "tool_calls"
    message = ChatMessageOut(
        content=content,
        reasoning_content=thought,
        tool_calls=[
            ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
            for c in calls
        ]
        or None,
    )
    logprobs = ChoiceLogprobs(content=out.logprobs) if out.logprobs else None
    choice = ChatChoice(message=message, logprobs=logprobs, finish_reason=reason)
    return ChatCompletion(
        id=head.id, created=head.created, model=head.model, choices=[choice], usage=out.usage
    )


async def _stream(
    request: Request,
    gen: Generation,
    req: ChatCompletionRequest,
    parser: ChatTextParser,
    head: ChunkHead,
) -> Response:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunks = chat_chunks(gen.stream, parser, head, include_usage=include_usage)
    handed_off = False
    try:
        first = await until_disconnect(request, anext(chunks))
        events = sse_events(first, chunks, lambda c: dump_chat_chunk(c, include_usage), INPUT_PARAM)
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
