"""Per-app shared state: config, decoder client, metrics, admission control, model resolution.

One ``GatewayState`` lives on ``app.state.gateway``; routes reach it through ``get_state``.
Admission is a plain counter (the gateway runs one event loop): above
``max_concurrent_requests`` a generation request gets 429 with Retry-After instead of queueing
without bound.
Not here: request parsing, HTTP responses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from gateway.config import GatewayConfig
from gateway.convert import ModelInfo
from gateway.decoder_client import DecoderClient
from gateway.errors import RATE_LIMIT, RETRY_AFTER_S, DecoderError, GatewayError, unavailable
from gateway.metrics import GatewayMetrics


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def acquire(self) -> None:
        if self.active >= self.limit:
            raise GatewayError(
                429,
                "too many concurrent requests; retry later",
                type=RATE_LIMIT,
                code="rate_limit_exceeded",
                headers={"Retry-After": RETRY_AFTER_S},
            )
        self.active += 1

    def release(self) -> None:
        self.active -= 1


@dataclass
class GatewayState:
    config: GatewayConfig
    client: DecoderClient
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        self.admission = Admission(self.config.max_concurrent_requests)

    def check_model_name(self, requested: str | None, served: str | None) -> None:
        if requested and served is not None and requested != served:
            raise GatewayError(
                404,
                f"The model {requested!r} does not exist; this server serves {served!r}",
                param="model",
                code="model_not_found",
            )

    async def resolve_model(self, requested: str | None) -> tuple[str, ModelInfo]:
        """The served name and model info, or 404 (unknown model) / 503 (decoder down)."""
        self.check_model_name(requested, self.config.served_model_name)
        try:
            info = await self.client.model_info()
        except DecoderError as exc:
            raise unavailable() from exc
        name = self.config.served_model_name or info.served_model_name
        self.check_model_name(requested, name)
        return name, info


def get_state(request: Request) -> GatewayState:
    return request.app.state.gateway
