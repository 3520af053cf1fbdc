"""FastAPI application factory of the OpenAI-compatible gateway.

``create_app(config)`` wires: the decoder client (closed on shutdown; readiness awaited in the
background so the HTTP port opens at once), the metrics middleware, the request-head size check
(431 for a head that arrived complete but is larger than ``max_header_bytes``; a head still
incomplete at that size is refused earlier, by the HTTP protocol in cli.py), OpenAI-shaped
error handlers, and the routers. Every router except /health carries the API-key dependency, so a new
route is protected unless it is deliberately added to the open router.
Not here: flags and the server loop (cli.py), request handling (routes/).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import require_api_key
from gateway.config import GatewayConfig
from gateway.decoder_client import DecoderClient
from gateway.errors import GatewayError, install_handlers
from gateway.metrics import GatewayMetrics, MetricsMiddleware
from gateway.routes import chat, completions, health, metrics, models
from gateway.state import GatewayState

log = logging.getLogger(__name__)


def create_app(config: GatewayConfig) -> FastAPI:
    app_metrics = GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The grpc.aio channel must be created inside the serving event loop.
        client = DecoderClient(config.decoder_target, max_message_bytes=config.max_payload_bytes)
        app.state.gateway = GatewayState(config, client, metrics=app_metrics)
        waiter = asyncio.create_task(client.wait_until_ready(config.decoder_wait_timeout))
        try:
            yield
        finally:
            waiter.cancel()
            await client.close()

    app = FastAPI(
        title="Glimpse gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.started = int(time.time())
    app.add_middleware(HeaderSizeLimit, max_bytes=config.max_header_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app_metrics)
    install_handlers(app)
    app.add_exception_handler(Exception, _internal_error)

    protected = APIRouter(dependencies=[Depends(require_api_key)])
    for module in (chat, completions, models, metrics):
        protected.include_router(module.router)
    app.include_router(protected)
    app.include_router(health.router)
    return app


def header_too_large() -> GatewayError:
    return GatewayError(
        431, "request headers are too large", code="request_header_fields_too_large"
    )


class HeaderSizeLimit:
    """431 for a request whose headers total more than ``max_bytes`` (name, value, ": ", CRLF)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > self.max_bytes:
                await header_too_large().response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    # Last-resort formatter: the traceback goes to the log, never to the client.
    log.exception("unhandled error", exc_info=exc)
    return GatewayError(500, "internal server error", code="internal_error").response()
