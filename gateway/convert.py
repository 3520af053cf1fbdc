"""The only gateway module that builds or reads protobuf messages.

Validated OpenAI requests (schemas.py) become ``GenerateRequest`` messages; ``GenerateResponse``,
``ModelInfo`` and health replies become plain dataclasses / response models the rest of the
gateway uses. Data URLs are decoded here and sent as raw bytes, so the decoder never sees base64.
Not here: validation (schemas.py, limits.py), channels and calls (decoder_client.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from grpc_health.v1 import health_pb2

from gateway.media_urls import decode_data_url
from gateway.responses import PromptTokensDetails, TokenLogprob, TopLogprob, Usage
from gateway.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    NamedToolChoice,
)
from protos import decoder_pb2 as pb

DECODER_SERVICE = "glimpse.decoder.v1.Decoder"

_FINISH = {pb.STOP: "stop", pb.LENGTH: "length", pb.ABORT: "abort"}
_MODALITIES = {pb.TEXT: "text", pb.IMAGE: "image", pb.VIDEO: "video"}
_TOOL_MODES = {
    None: pb.ToolChoice.AUTO,
    "auto": pb.ToolChoice.AUTO,
    "none": pb.ToolChoice.NONE,
    "required": pb.ToolChoice.REQUIRED,
}


@dataclass(frozen=True)
class ModelInfo:
    served_model_name: str
    model_type: str
    max_model_len: int
    vocab_size: int
    modalities: tuple[str, ...]
    max_images_per_prompt: int  # 0: no limit
    max_videos_per_prompt: int  # 0: no limit
    eos_token_ids: tuple[int, ...]


@dataclass
class DecodedChunk:
    """One GenerateResponse, in gateway terms."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None  # "stop" | "length" | "abort"; None until the last chunk
    usage: Usage | None


# --- requests ------------------------------------------------------------------------------------


def chat_request(
    req: ChatCompletionRequest, request_id: str, *, keep_special_tokens: bool
) -> pb.GenerateRequest:
    """``keep_special_tokens``: output parsers need `<think>`/`<tool_call>` in the text."""
    chat = pb.ChatInput(messages=[_message(m) for m in req.messages])
    for tool in req.tools or []:
        fn = tool.function
        params = json.dumps(fn.parameters) if fn.parameters is not None else ""
        chat.tools.add(name=fn.name, description=fn.description or "", parameters_json=params)
    if isinstance(req.tool_choice, NamedToolChoice):
        chat.tool_choice.mode = pb.ToolChoice.NAMED
        chat.tool_choice.function_name = req.tool_choice.function.name
    else:
        chat.tool_choice.mode = _TOOL_MODES[req.tool_choice]
    if req.enable_thinking is not None:
        chat.enable_thinking = req.enable_thinking
    sampling = _sampling(req, req.output_limit, keep_special_tokens)
    sampling.logprobs = bool(req.logprobs)
    sampling.top_logprobs = req.top_logprobs or 0
    if req.thinking_budget is not None:
        sampling.thinking_budget = req.thinking_budget
    return pb.GenerateRequest(request_id=request_id, chat=chat, sampling=sampling)


def completion_request(req: CompletionRequest, request_id: str) -> pb.GenerateRequest:
    # OpenAI's legacy default is 16 tokens when max_tokens is absent.
    sampling = _sampling(req, req.max_tokens or 16, req.skip_special_tokens is False)
    if req.logprobs is not None:
        sampling.logprobs = True
        sampling.top_logprobs = req.logprobs
    out = pb.GenerateRequest(request_id=request_id, sampling=sampling)
    if isinstance(req.prompt, str):
        out.prompt = req.prompt
    else:
        out.token_ids.ids.extend(req.prompt)
    return out


def _sampling(
    req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None, keep_special: bool
) -> pb.SamplingParams:
    out = pb.SamplingParams(
        stop=req.stop or [],
        stop_token_ids=req.stop_token_ids or [],
        ignore_eos=bool(req.ignore_eos),
    )
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
    ):
        value = getattr(req, name)
        if value is not None:
            setattr(out, name, value)
    if max_tokens is not None:
        out.max_tokens = max_tokens
    if keep_special:
        out.skip_special_tokens = False
    elif req.skip_special_tokens is not None:
        out.skip_special_tokens = req.skip_special_tokens
    return out


def _message(msg: ChatMessage) -> pb.ChatMessage:
    out = pb.ChatMessage(
        role="system" if msg.role == "developer" else msg.role,
        content=[_part(p) for p in msg.content or []],
        name=msg.name or "",
        reasoning_content=msg.reasoning_content or "",
        tool_call_id=msg.tool_call_id or "",
    )
    for call in msg.tool_calls or []:
        out.tool_calls.add(
            id=call.id, name=call.function.name, arguments_json=call.function.arguments
        )
    return out


def _part(part: ContentPart) -> pb.ContentPart:
    if part.type == "text":
        return pb.ContentPart(text=part.text or "")
    if part.type == "image_url":
        assert part.image_url is not None
        url = part.image_url.url
        if url.startswith("data:"):
            mime, data = decode_data_url(url)
            return pb.ContentPart(image=pb.ImageInput(data=data, mime_type=mime))
        return pb.ContentPart(image=pb.ImageInput(url=url))
    assert part.video_url is not None
    video = part.video_url
    item = pb.VideoInput()
    if video.url.startswith("data:"):
        item.mime_type, item.data = decode_data_url(video.url)
    else:
        item.url = video.url
    if video.fps is not None:
        item.fps = video.fps
    if video.max_frames is not None:
        item.max_frames = video.max_frames
    return pb.ContentPart(video=item)


def model_info_request() -> pb.GetModelInfoRequest:
    return pb.GetModelInfoRequest()


def health_request() -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=DECODER_SERVICE)


# --- responses -----------------------------------------------------------------------------------


def is_serving(reply: health_pb2.HealthCheckResponse) -> bool:
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def model_info(msg: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        served_model_name=msg.served_model_name,
        model_type=msg.model_type,
        max_model_len=msg.max_model_len,
        vocab_size=msg.vocab_size,
        modalities=tuple(_MODALITIES[m] for m in msg.modalities if m in _MODALITIES),
        max_images_per_prompt=msg.limits.max_images_per_prompt,
        max_videos_per_prompt=msg.limits.max_videos_per_prompt,
        eos_token_ids=tuple(msg.eos_token_ids),
    )


def chunk(msg: pb.GenerateResponse) -> DecodedChunk:
    usage = None
    if msg.HasField("usage"):
        u = msg.usage
        usage = Usage(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            total_tokens=u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens),
        )
    return DecodedChunk(
        token_ids=list(msg.token_ids),
        text=msg.text,
        logprobs=[_logprob(lp) for lp in msg.logprobs],
        finish_reason=_FINISH.get(msg.finish_reason),
        usage=usage,
    )


def _logprob(lp: pb.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        token=lp.token,
        logprob=lp.logprob,
        bytes=list(lp.token_bytes),
        top_logprobs=[
            TopLogprob(token=t.token, logprob=t.logprob, bytes=list(t.token_bytes))
            for t in lp.top_logprobs
        ],
    )
