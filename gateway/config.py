"""The gateway's one frozen configuration object.

Built by ``gateway.cli`` from flags (defaults come from here) and handed to ``create_app``.
Environment variables are read in exactly one place: ``GatewayConfig.from_env_defaults``.
Not here: argparse, validation of requests, anything that talks to the decoder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

API_KEY_ENV = "GLIMPSE_API_KEY"
PARSERS = ("glm45",)


@dataclass(frozen=True)
class GatewayConfig:
    # gRPC target of the decoder service, "host:port" (a "grpc://" prefix is accepted).
    decoder_url: str = "127.0.0.1:50051"
    host: str = "0.0.0.0"
    port: int = 8000
    # Bearer token required on every /v1 route and /metrics; None serves without auth.
    api_key: str | None = None
    # Name clients send as `model`; None takes the decoder's served model name.
    served_model_name: str | None = None
    # Largest accepted request body (base64 media included); larger bodies get 413.
    max_payload_bytes: int = 64 * 1024 * 1024
    # Largest accepted request head (request line + headers); uvicorn refuses larger ones.
    max_header_bytes: int = 64 * 1024
    # Deadline of one generation on the decoder, in seconds; past it the client gets 504.
    request_timeout: float = 600.0
    # How long startup keeps waiting (in the background) for the decoder to become reachable.
    decoder_wait_timeout: float = 600.0
    # Text parsers applied to model output ("glm45" or None).
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    # Generation requests in flight above this get 429 with Retry-After.
    max_concurrent_requests: int = 512

    def __post_init__(self) -> None:
        if self.max_payload_bytes <= 0 or self.max_header_bytes <= 0:
            raise ValueError("size limits must be positive")
        if self.request_timeout <= 0 or self.max_concurrent_requests <= 0:
            raise ValueError("request_timeout and max_concurrent_requests must be positive")
        for name in ("reasoning_parser", "tool_call_parser"):
            value = getattr(self, name)
            if value is not None and value not in PARSERS:
                raise ValueError(f"{name} must be one of {PARSERS}, got {value!r}")
        if self.api_key == "":
            raise ValueError("api_key must not be empty (omit it to disable auth)")

    @property
    def decoder_target(self) -> str:
        """The decoder address in the form grpc expects."""
        url = self.decoder_url
        return url.removeprefix("grpc://")

    def from_env_defaults(self) -> GatewayConfig:
        """Fill fields left unset from the environment (only the API key, for now)."""
        if self.api_key is None and os.environ.get(API_KEY_ENV):
            return replace(self, api_key=os.environ[API_KEY_ENV])
        return self
