"""FastAPI application factory of the OpenAI-compatible gateway.

``create_app(config)`` wires: the decoder client (closed on shutdown; readiness awaited in the
background so the HTTP port opens at once), the metrics middleware, OpenAI-shaped error
handlers, and the routers. Every router except /health carries the API-key dependency, so a new
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
    app.add_middleware(MetricsMiddleware, metrics=app_metrics)
    install_handlers(app)
    app.add_exception_handler(Exception, _internal_error)

    protected = APIRouter(dependencies=[Depends(require_api_key)])
    for module in (chat, completions, models, metrics):
        protected.include_router(module.router)
    app.include_router(protected)
    app.include_router(health.router)
    return app


async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
    # Last-resort formatter: the traceback goes to the log, never to the client.
    log.exception("unhandled error", exc_info=exc)
    return GatewayError(500, "internal server error", code="internal_error").response()
