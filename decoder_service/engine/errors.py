"""Typed errors raised by the decoder engine.

Contract: every error a caller can cause is an ``InvalidRequestError`` raised by
``LLMEngine.add_request`` before the request touches the batch, so requests already in flight
are unaffected; services map the class to a status code (``InvalidRequestError`` ->
INVALID_ARGUMENT, ``KVCapacityError`` -> RESOURCE_EXHAUSTED) without parsing text. ``param``
names the offending field where there is one. Nothing here knows about gRPC or HTTP.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of all errors raised by the engine."""


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be served as given; nothing about it entered the scheduler."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidSamplingParamsError(InvalidRequestError):
    """A sampling value is out of range (negative temperature, top_p outside (0, 1], ...)."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (or prompt plus one generated token) exceeds ``max_model_len``."""


class TooManyMediaError(InvalidRequestError):
    """The prompt carries more images or videos than ``limit_mm_per_prompt`` allows."""


class MediaSpanError(InvalidRequestError):
    """A media item's token spans or embeddings do not match the prompt."""


class KVCapacityError(InvalidRequestError):
    """The request needs more KV blocks than the whole pool holds, so it could never finish."""


class DuplicateRequestError(InvalidRequestError):
    """A request with this id is already in the engine."""


class UnknownRequestError(EngineError, KeyError):
    """No unfinished request has this id."""
