"""Pydantic models of the OpenAI requests the gateway accepts, with every model-independent check.

A request that validates here is well-formed: types, ranges, `n == 1`, at most 4 stop strings,
content parts of a known type with `{"url": ...}` objects, http(s)/data/file URLs without
userinfo or control characters, decodable base64 in data URLs, tool schemas that are objects with
sane `type`/`pattern` fields, and a tool_choice naming a declared function. Checks that need the
served model (context length, vocabulary, media counts) live in ``gateway.limits``.
Unknown top-level fields are ignored for compatibility with OpenAI clients that send extras.
Not here: response shapes (responses.py), conversion to protobuf (convert.py).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.errors import FieldError
from gateway.media_urls import check_media_url
from gateway.tool_schema import check_tool_schema

StrictInt = Annotated[int, Field(strict=True)]
StrictFloat = Annotated[float, Field(strict=True)]
UINT32_MAX = 2**32 - 1
MAX_TOOLS = 128
MAX_STOP = 4
_TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --- content parts ------------------------------------------------------------------------------


class ImageURL(_Model):
    url: str
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        return check_media_url(url)


class VideoURL(_Model):
    url: str
    # Glimpse extensions: per-video sampling options forwarded to the processor.
    fps: Annotated[StrictFloat, Field(gt=0, le=120)] | None = None
    max_frames: Annotated[StrictInt, Field(ge=1, le=100_000)] | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        return check_media_url(url)


class ContentPart(_Model):
    # One model with a checked `type` instead of a union: union members would put pydantic's
    # internal labels into the error path reported as `param`.
    type: Literal["text", "image_url", "video_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    video_url: VideoURL | None = None

    @model_validator(mode="after")
    def _payload_matches_type(self) -> ContentPart:
        if getattr(self, self.type) is None:
            raise ValueError(f"a {self.type!r} content part needs a {self.type!r} field")
        return self


def _text_to_parts(content: Any) -> Any:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


# --- messages and tools -------------------------------------------------------------------------


class FunctionCall(_Model):
    name: str
    arguments: str


class ToolCallIn(_Model):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    _text_content = field_validator("content", mode="before")(_text_to_parts)

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role!r} message needs content")
        return self


class FunctionDef(_Model):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _TOOL_NAME_RE.match(name):
            raise ValueError("function names are 1-64 characters of A-Z, a-z, 0-9, _, . and -")
        return name

    @field_validator("parameters")
    @classmethod
    def _check_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            check_tool_schema(schema)
        return schema


class ToolDef(_Model):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Model):
    include_usage: bool = False


# --- sampling shared by both endpoints ------------------------------------------------------------


class _SamplingFields(_Model):
    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[StrictFloat, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0, le=1)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=UINT32_MAX // 2)] | None = None
    min_p: Annotated[StrictFloat, Field(ge=0, le=1)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    n: StrictInt | None = None
    stop: list[str] | None = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: Annotated[StrictFloat, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[StrictFloat, Field(gt=0, le=10)] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    logit_bias: dict[str, StrictFloat] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, stop: Any) -> Any:
        return [stop] if isinstance(stop, str) else stop

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: list[str] | None) -> list[str] | None:
        if stop is not None:
            if len(stop) > MAX_STOP:
                raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
            if any(s == "" for s in stop):
                raise ValueError("stop sequences must not be empty")
        return stop

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not key.isdigit() or not -100 <= value <= 100:
                raise ValueError("logit_bias maps token ids to values in [-100, 100]")
        if bias:
            raise ValueError("logit_bias is not supported by this server")
        return bias

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


# --- endpoints ------------------------------------------------------------------------------------


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None
    # "auto" (default): the model decides. "none": the tools are not shown to the model and no
    # tool call is parsed. "required": once reasoning is over the decoder forces `<tool_call>`,
    # so the answer is a call. Named: only that function is shown and the decoder forces
    # `<tool_call>NAME\n`; the model writes the arguments. (protos/decoder.proto ToolChoice.)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Glimpse extension: most tokens the model may generate inside <think>; then the decoder
    # forces `</think>` + newline and the answer follows. Forced tokens count as completion
    # tokens and carry the model's logprobs. None: unlimited; 0: closed as soon as it opens.
    thinking_budget: Annotated[StrictInt, Field(ge=0, le=UINT32_MAX)] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _check_kwargs(cls, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        if kwargs and not isinstance(kwargs.get("enable_thinking", True), bool):
            raise ValueError("enable_thinking must be a boolean")
        return kwargs

    @field_validator("response_format")
    @classmethod
    def _check_response_format(cls, fmt: dict[str, Any] | None) -> dict[str, Any] | None:
        if fmt is None or fmt.get("type") == "text":
            return fmt
        if fmt.get("type") == "json_schema" and not isinstance(
            (fmt.get("json_schema") or {}).get("schema"), dict
        ):
            raise ValueError("json_schema response_format needs json_schema.schema")
        raise ValueError("only response_format type 'text' is supported by this server")

    @model_validator(mode="after")
    def _check_tools(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs requires logprobs to be true")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise FieldError("tools", "tool function names must be unique")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not names:
            raise FieldError("tool_choice", "tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise FieldError("tool_choice", f"no tool named {choice.function.name!r}")
        return self

    @property
    def enable_thinking(self) -> bool | None:
        return (self.chat_template_kwargs or {}).get("enable_thinking")

    @property
    def output_limit(self) -> int | None:
        """max_completion_tokens wins over the older max_tokens."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    logprobs: Annotated[StrictInt, Field(ge=0, le=5)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: StrictInt | None = None

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise FieldError("prompt", "only one prompt per request is supported")
            self.prompt = prompt[0]
        if not self.prompt:
            raise FieldError("prompt", "prompt must not be empty")
        if any(t < 0 for t in self.prompt if isinstance(t, int)):
            raise FieldError("prompt", "token ids must be non-negative")
        for name, unsupported in (
            ("echo", self.echo),
            ("suffix", self.suffix),
            ("best_of", (self.best_of or 1) != 1),
        ):
            if unsupported:
                raise FieldError(name, f"{name} is not supported by this server")
        return self
