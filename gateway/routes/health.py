"""GET /health: 200 when the decoder reports SERVING, else 503 (open without an API key).

Load balancers and `glimpse serve` poll it; it asks the decoder's grpc.health.v1 service each
time, so a decoder that is loading, draining or gone takes this gateway out of rotation.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gateway.errors import unavailable
from gateway.state import get_state

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    if await get_state(request).client.is_serving():
        return JSONResponse({"status": "ok"})
    return unavailable().response()
