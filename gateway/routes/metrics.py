"""GET /metrics: Prometheus text exposition of the gateway's registry (behind the API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.state import get_state

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body = generate_latest(get_state(request).metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
