"""Errors the decoder service reports to its clients, and the mapping of engine errors into them.

Contract: every failure a caller can see is a ``ServiceError`` with a ``Status`` (which gRPC code
the servicer sends), a machine-readable ``reason`` from protos/decoder.proto and a short message
that never contains raw exception text. ``details`` renders the status details exactly as the
proto specifies: ``REASON[.PARAM]: MESSAGE``. ``from_engine_error`` maps the engine's typed
admission errors. Nothing here imports gRPC; the servicer maps ``Status`` to status codes.
"""

from __future__ import annotations

import enum

from decoder_service.engine.errors import (
    DuplicateRequestError,
    InvalidRequestError,
    InvalidSamplingParamsError,
    KVCapacityError,
    MediaSpanError,
    PromptTooLongError,
    TooManyMediaError,
)


class Status(enum.Enum):
    INVALID = "invalid"  # INVALID_ARGUMENT: the client must change the request
    EXHAUSTED = "exhausted"  # RESOURCE_EXHAUSTED: overloaded, retry later
    UNAVAILABLE = "unavailable"  # UNAVAILABLE: not serving (loading, draining, no encoder)
    DEADLINE = "deadline"  # DEADLINE_EXCEEDED: a deadline ran out
    INTERNAL = "internal"  # INTERNAL: a bug; the message is logged, not shown


class ServiceError(Exception):
    def __init__(self, status: Status, reason: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.param = param

    @property
    def details(self) -> str:
        if self.status in (Status.INVALID, Status.EXHAUSTED):
            head = f"{self.reason}.{self.param}" if self.param else self.reason
            return f"{head}: {self.message}"
        return self.message


def invalid(reason: str, message: str, param: str | None = None) -> ServiceError:
    return ServiceError(Status.INVALID, reason, message, param)


def invalid_parameter(param: str, message: str) -> ServiceError:
    return ServiceError(Status.INVALID, "invalid_parameter", message, param)


def unavailable(message: str) -> ServiceError:
    return ServiceError(Status.UNAVAILABLE, "unavailable", message)


def queue_full(message: str) -> ServiceError:
    return ServiceError(Status.EXHAUSTED, "queue_full", message)


def internal(message: str) -> ServiceError:
    return ServiceError(Status.INTERNAL, "internal", message)


def from_engine_error(err: InvalidRequestError) -> ServiceError:
    """The client-facing error for an engine admission failure (matched by class, not text)."""
    message = str(err)
    if isinstance(err, PromptTooLongError):
        return invalid("context_length_exceeded", message)
    if isinstance(err, KVCapacityError):
        return invalid("max_tokens_exceeded", message)
    if isinstance(err, TooManyMediaError):
        reason = "too_many_videos" if "video" in message else "too_many_images"
        return invalid(reason, message)
    if isinstance(err, InvalidSamplingParamsError):
        return invalid_parameter(err.param or "sampling", message)
    if isinstance(err, DuplicateRequestError):
        return invalid_parameter("request_id", message)
    if isinstance(err, MediaSpanError):
        # Spans and embeddings are built by this service, so a mismatch is our bug.
        return internal(message)
    if err.param in (None, "prompt"):
        return invalid("invalid_prompt", message)
    return invalid_parameter(err.param, message)
