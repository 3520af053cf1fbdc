"""The only decoder-service module that reads or builds ``decoder_pb2`` messages.

Contract: ``generate_input`` turns a ``GenerateRequest`` into a ``GenerateInput`` (inputs.py),
refusing malformed fields with ``ServiceError``s that carry the proto's reasons (the request's
shape only: limits that need the model or the prompt are checked later). ``response`` builds a
``GenerateResponse`` from a ``StreamChunk``; ``model_info`` a ``ModelInfo`` from ``ServedModel``.
Not here: rendering, media, engine calls, gRPC status handling (servicer.py).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

from decoder_service.engine.sampling_params import SamplingParams
from decoder_service.errors import invalid, invalid_parameter
from decoder_service.inputs import ChatRequest, GenerateInput, MediaSource
from decoder_service.request_stream import StreamChunk
from decoder_service.token_text import TokenText
from protos import decoder_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Decoder"].full_name
MAX_STOP_STRINGS = 4
MAX_REQUEST_ID_CHARS = 256
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}
_TOOL_CHOICES = {  # modes that force a call (NONE drops the tools instead)
    pb.ToolChoice.REQUIRED: "required",
    pb.ToolChoice.NAMED: "named",
}
_FINISH = {"stop": pb.STOP, "length": pb.LENGTH, "abort": pb.ABORT}
_MODALITIES = {"text": pb.TEXT, "image": pb.IMAGE, "video": pb.VIDEO}


@dataclass(frozen=True)
class ServedModel:
    """What GetModelInfo reports; fixed for the life of the process."""

    served_model_name: str
    model_type: str
    max_model_len: int
    vocab_size: int
    modalities: tuple[str, ...]  # "text", "image", "video"
    max_images_per_prompt: int
    max_videos_per_prompt: int
    eos_token_ids: tuple[int, ...]


# --- requests --------------------------------------------------------------------------------


def generate_input(msg: pb.GenerateRequest) -> GenerateInput:
    request_id = msg.request_id or f"gen-{uuid.uuid4().hex}"
    if len(request_id) > MAX_REQUEST_ID_CHARS or not request_id.isprintable():
        raise invalid_parameter("request_id", "request_id must be printable, at most 256 chars")
    sampling, max_tokens = sampling_params(msg.sampling)
    budget = msg.sampling.thinking_budget if msg.sampling.HasField("thinking_budget") else None
    kind = msg.WhichOneof("input")
    chat = prompt = token_ids = None
    if kind == "chat":
        chat = _chat(msg.chat)
    elif kind == "prompt":
        if not msg.prompt:
            raise invalid("invalid_prompt", "prompt is empty")
        prompt = msg.prompt
    elif kind == "token_ids":
        if not msg.token_ids.ids:
            raise invalid("invalid_prompt", "token_ids is empty")
        token_ids = list(msg.token_ids.ids)
    else:
        raise invalid("invalid_prompt", "set exactly one of chat, prompt or token_ids")
    return GenerateInput(request_id, chat, prompt, token_ids, sampling, max_tokens, budget)


def sampling_params(sp: pb.SamplingParams) -> tuple[SamplingParams, int | None]:
    """Engine parameters (max_tokens left at its default, nothing forced yet: the forced token
    ids need the tokenizer) and the requested max_tokens."""
    if sp.HasField("temperature") and not (
        math.isfinite(sp.temperature) and 0.0 <= sp.temperature <= 2.0
    ):
        raise invalid_parameter("temperature", "temperature must be in [0, 2]")
    if sp.HasField("max_tokens") and sp.max_tokens < 1:
        raise invalid_parameter("max_tokens", "max_tokens must be at least 1")
    if len(sp.stop) > MAX_STOP_STRINGS:
        raise invalid_parameter("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    if sp.top_logprobs and not sp.logprobs:
        raise invalid_parameter("top_logprobs", "top_logprobs needs logprobs")
    fields: dict[str, Any] = {}
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "skip_special_tokens",
    ):
        if sp.HasField(name):
            fields[name] = getattr(sp, name)
    params = SamplingParams(
        stop=tuple(sp.stop),
        stop_token_ids=tuple(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        logprobs=sp.logprobs,
        top_logprobs=sp.top_logprobs,
        **fields,
    )
    return params, (sp.max_tokens if sp.HasField("max_tokens") else None)


def _chat(chat: pb.ChatInput) -> ChatRequest:
    if not chat.messages:
        raise invalid("invalid_messages", "messages must not be empty")
    messages = [_message(i, m) for i, m in enumerate(chat.messages)]
    tools = [_tool(t) for t in chat.tools]
    mode, name = chat.tool_choice.mode, ""
    if mode == pb.ToolChoice.NAMED:
        name = chat.tool_choice.function_name
        tools = [t for t in tools if t["function"]["name"] == name]
        if not tools:
            raise invalid_parameter("tool_choice", "tool_choice names a function not in tools")
        # the model is shown only the function it must call
    elif mode == pb.ToolChoice.NONE:
        tools = []  # not rendered: the model is not told about tools at all
    choice = _TOOL_CHOICES.get(mode, "auto") if tools else "auto"
    thinking = chat.enable_thinking if chat.HasField("enable_thinking") else None
    return ChatRequest(messages, tools or None, thinking, choice, name)


def _message(index: int, msg: pb.ChatMessage) -> dict[str, Any]:
    role = _ROLES.get(msg.role)
    if role is None:
        raise invalid("invalid_messages", f"message {index}: unknown role {msg.role[:32]!r}")
    out: dict[str, Any] = {"role": role, "content": [_part(index, p) for p in msg.content]}
    if msg.name:
        out["name"] = msg.name
    if msg.reasoning_content:
        out["reasoning_content"] = msg.reasoning_content
    if msg.tool_call_id:
        out["tool_call_id"] = msg.tool_call_id
    if msg.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_json or "{}"},
            }
            for call in msg.tool_calls
        ]
    if not out["content"]:
        out["content"] = ""
    return out


def _part(index: int, part: pb.ContentPart) -> dict[str, Any]:
    kind = part.WhichOneof("part")
    if kind == "text":
        return {"type": "text", "text": part.text}
    if kind == "image":
        return {"type": "image", "image": _source("image", index, part.image)}
    if kind == "video":
        video = part.video
        if video.HasField("fps") and not (math.isfinite(video.fps) and video.fps > 0):
            raise invalid("invalid_video", f"message {index}: video fps must be positive")
        src = _source("video", index, video)
        return {"type": "video", "video": src}
    raise invalid("invalid_messages", f"message {index}: a content part has nothing set")


def _source(modality: str, index: int, item: pb.ImageInput | pb.VideoInput) -> MediaSource:
    which = item.WhichOneof("source")
    fps = max_frames = None
    if isinstance(item, pb.VideoInput):
        fps = item.fps if item.HasField("fps") else None
        max_frames = item.max_frames if item.HasField("max_frames") else None
    if which == "url" and item.url:
        return MediaSource(modality, url=item.url, fps=fps, max_frames=max_frames)
    if which == "data" and item.data:
        return MediaSource(modality, data=bytes(item.data), fps=fps, max_frames=max_frames)
    raise invalid(f"invalid_{modality}", f"message {index}: {modality} has no url or data")


def _tool(tool: pb.Tool) -> dict[str, Any]:
    if not _TOOL_NAME.match(tool.name):
        raise invalid_parameter("tools", "tool names must match [A-Za-z0-9_.-]{1,64}")
    fn: dict[str, Any] = {"name": tool.name}
    if tool.description:
        fn["description"] = tool.description
    if tool.parameters_json:
        try:
            params = json.loads(tool.parameters_json)
        except json.JSONDecodeError:
            params = None
        if not isinstance(params, dict):
            raise invalid_parameter("tools", f"parameters of {tool.name} are not a JSON object")
        fn["parameters"] = params
    return {"type": "function", "function": fn}


# --- responses -------------------------------------------------------------------------------


def response(chunk: StreamChunk, token_text: TokenText) -> pb.GenerateResponse:
    out = pb.GenerateResponse(token_ids=chunk.token_ids, text=chunk.text)
    for token_id, lp in zip(chunk.token_ids, chunk.logprobs or (), strict=False):
        entry = out.logprobs.add(
            token_id=token_id,
            token=token_text.text(token_id),
            logprob=lp.logprob,
            token_bytes=token_text.bytes(token_id),
        )
        for alt_id, alt_lp in lp.top:
            entry.top_logprobs.add(
                token_id=alt_id,
                token=token_text.text(alt_id),
                logprob=alt_lp,
                token_bytes=token_text.bytes(alt_id),
            )
    if chunk.finish_reason is not None:
        out.finish_reason = _FINISH[chunk.finish_reason]
        out.usage.prompt_tokens = chunk.prompt_tokens
        out.usage.completion_tokens = chunk.completion_tokens
        out.usage.cached_tokens = chunk.cached_tokens
    return out


def model_info(info: ServedModel) -> pb.ModelInfo:
    return pb.ModelInfo(
        served_model_name=info.served_model_name,
        model_type=info.model_type,
        max_model_len=info.max_model_len,
        vocab_size=info.vocab_size,
        modalities=[_MODALITIES[m] for m in info.modalities],
        limits=pb.Limits(
            max_images_per_prompt=info.max_images_per_prompt,
            max_videos_per_prompt=info.max_videos_per_prompt,
        ),
        eos_token_ids=list(info.eos_token_ids),
    )
