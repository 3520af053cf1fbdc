"""Internal form of a Generate request, after conversion from protobuf and before the engine.

Contract: plain frozen dataclasses built by ``convert.py`` and read by the servicer and
``media_dispatch.py``. ``ChatRequest.messages`` are OpenAI-style dicts ready for the chat
template; each media part carries a ``MediaSource`` as its payload, so the rendered prompt hands
the same objects back in prompt order. Sampling values the prompt length decides (the default
``max_tokens``) stay ``None`` here. No protobuf, no gRPC, no behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from decoder_service.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class MediaSource:
    """One image or video as the client sent it: a URL or the encoded bytes."""

    modality: str  # "image" or "video"
    url: str | None = None
    data: bytes | None = None
    fps: float | None = None  # videos: sampling rate override
    max_frames: int | None = None  # videos: frame cap override


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]  # OpenAI-style; media parts hold MediaSource payloads
    tools: list[dict[str, Any]] | None  # OpenAI `tools` entries for the template, None = none
    enable_thinking: bool | None  # None = the template's default
    # "auto" (the model decides; also whenever ``tools`` is None), "required" (a call is forced
    # once reasoning is over) or "named" (a call of ``tool_name``, the only tool in ``tools``)
    tool_choice: str = "auto"
    tool_name: str = ""  # the function a "named" choice calls


@dataclass(frozen=True)
class GenerateInput:
    request_id: str
    chat: ChatRequest | None  # exactly one of chat / prompt / token_ids is set
    prompt: str | None
    token_ids: list[int] | None
    sampling: SamplingParams  # max_tokens filled in once the prompt length is known
    max_tokens: int | None  # None = the rest of the context window
    thinking_budget: int | None = None  # tokens allowed inside <think>; None = no limit
