"""OpenAI-shaped errors: one exception type, the mappings into it, and the FastAPI handlers.

Every error the gateway returns has the body ``{"error": {"message", "type", "param", "code"}}``
and the HTTP status on the response line only. Sources mapped here: pydantic validation (400, never
FastAPI's 422), decoder gRPC statuses (RELIABILITY.md §2, with the reason prefix defined in
protos/decoder.proto turned into ``code``/``param``), and Starlette's own 404/405.
Not here: deciding *whether* a request is valid (schemas.py, limits.py).
"""

from __future__ import annotations

import logging
import re

import grpc
import pydantic
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
RATE_LIMIT = "rate_limit_error"
RETRY_AFTER_S = "1"


class GatewayError(Exception):
    """An error answered to the client as an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or (INVALID_REQUEST if status < 500 else SERVER_ERROR)
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class FieldError(ValueError):
    """A cross-field validation failure that names the field to blame (reported as `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class DecoderError(Exception):
    """A Generate/GetModelInfo call ended with a non-OK gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


# --- gRPC status -> HTTP ------------------------------------------------------------------------

_HTTP_FROM_GRPC: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# decoder reason -> (OpenAI code, param); None param means "the request's input field".
_REASONS: dict[str, tuple[str, str | None]] = {
    "context_length_exceeded": ("context_length_exceeded", None),
    "max_tokens_exceeded": ("context_length_exceeded", "max_tokens"),
    "too_many_images": ("too_many_images", None),
    "too_many_videos": ("too_many_videos", None),
    "invalid_image": ("invalid_image", "image_url"),
    "invalid_video": ("invalid_video", "video_url"),
    "invalid_messages": ("invalid_value", None),
    "invalid_prompt": ("invalid_value", "prompt"),
    "invalid_parameter": ("invalid_value", None),
    "queue_full": ("rate_limit_exceeded", None),
}
_DETAILS_RE = re.compile(r"^([a-z_]+)(?:\.([A-Za-z0-9_.\[\]]+))?: (.*)$", re.DOTALL)
_MAX_MESSAGE_CHARS = 1000


def from_decoder(err: DecoderError, input_param: str) -> GatewayError:
    """Map a decoder status to the client's error; ``input_param`` is "messages" or "prompt"."""
    status = _HTTP_FROM_GRPC.get(err.code, 500)
    details = err.details or ""
    if err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        # gRPC's own message-size limit: the request was too big, not the server too busy.
        return GatewayError(413, "request is too large for the decoder", code="payload_too_large")
    if status >= 500 or status == 499:
        log.warning("decoder call failed: %s %s", err.code.name, details[:_MAX_MESSAGE_CHARS])
        return _server_side(err.code)
    match = _DETAILS_RE.match(details)
    code, param, message = None, None, details
    if match and match.group(1) in _REASONS:
        reason, sub_param, message = match.groups()
        code, param = _REASONS[reason]
        param = sub_param if reason == "invalid_parameter" else param
        if param is None and reason != "queue_full":
            param = input_param
    headers = {"Retry-After": RETRY_AFTER_S} if status == 429 else None
    kind = RATE_LIMIT if status == 429 else None
    return GatewayError(
        status,
        message[:_MAX_MESSAGE_CHARS] or err.code.name.lower(),
        type=kind,
        param=param,
        code=code,
        headers=headers,
    )


def _server_side(code: grpc.StatusCode) -> GatewayError:
    # NOTE: 5xx details are logged, never echoed: they may hold internal paths or exception text.
    if code == grpc.StatusCode.UNAVAILABLE:
        return unavailable()
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayError(504, "the request timed out in the decoder", code="timeout")
    if code == grpc.StatusCode.CANCELLED:
        return GatewayError(499, "the request was cancelled", code="cancelled")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return GatewayError(501, "the decoder does not implement this call", code="not_implemented")
    return GatewayError(500, "the decoder failed to process the request", code="internal_error")


def unavailable() -> GatewayError:
    return GatewayError(
        503,
        "the decoder is not available; retry later",
        code="decoder_unavailable",
        headers={"Retry-After": RETRY_AFTER_S},
    )


# --- pydantic -> 400 ----------------------------------------------------------------------------

# Labels pydantic inserts into error locations for union members and validators; not field names.
_UNION_LABELS = {"str", "int", "float", "bool", "dict", "list", "none"}


def param_from_loc(loc: tuple[int | str, ...]) -> str | None:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif "[" in item or item in _UNION_LABELS:
            continue
        else:
            parts.append(item)
    return ".".join(parts) or None


def from_validation(exc: pydantic.ValidationError | RequestValidationError) -> GatewayError:
    """The first validation problem as a 400 whose ``param`` is the offending field's path."""
    first = exc.errors()[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        return GatewayError(400, str(cause), param=cause.param, code="invalid_value")
    loc = tuple(first.get("loc", ()))
    if isinstance(exc, RequestValidationError) and loc and loc[0] == "body":
        loc = loc[1:]
    param = param_from_loc(loc)
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if param:
        message = f"{param}: {message}"
    return GatewayError(400, message[:_MAX_MESSAGE_CHARS], param=param, code="invalid_value")


# --- handlers ------------------------------------------------------------------------------------


async def _gateway_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    return exc.response()


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return from_validation(exc).response()


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    return GatewayError(
        exc.status_code, message, code=code, headers=dict(exc.headers or {})
    ).response()


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
