"""Reading a request body as one JSON object and validating it into a schema model.

The body is read incrementally and refused with 413 once it passes the configured cap (a lying
or absent Content-Length does not help); non-JSON content types get 415; malformed JSON, NaN /
Infinity literals, and bodies that are not a JSON object get 400. Validation failures become 400
with the failing field as ``param`` (errors.from_validation).
Not here: what the fields mean (schemas.py).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import pydantic
from fastapi import Request

from gateway.errors import GatewayError, from_validation

T = TypeVar("T", bound=pydantic.BaseModel)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, f"request body exceeds {limit} bytes", code="payload_too_large")


async def read_json_object(request: Request, max_bytes: int) -> dict[str, Any]:
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise GatewayError(415, "Content-Type must be application/json", code="unsupported_media")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    try:
        obj = json.loads(bytes(body), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise GatewayError(400, "request body is not valid JSON", code="invalid_json") from exc
    if not isinstance(obj, dict):
        raise GatewayError(400, "request body must be a JSON object", code="invalid_json")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_request(model: type[T], obj: dict[str, Any]) -> T:
    try:
        return model.model_validate(obj)
    except pydantic.ValidationError as exc:
        raise from_validation(exc) from None
