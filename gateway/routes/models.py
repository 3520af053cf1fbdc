"""GET /v1/models and /v1/models/{model}: the one served model (503 while the decoder is down)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from gateway.responses import ModelCard, ModelList
from gateway.state import get_state

router = APIRouter(prefix="/v1")


@router.get("/models")
async def list_models(request: Request) -> dict:
    name, info = await get_state(request).resolve_model(None)
    card = ModelCard(id=name, created=request.app.state.started, max_model_len=info.max_model_len)
    return ModelList(data=[card]).model_dump()


@router.get("/models/{model:path}")
async def get_model(model: str, request: Request) -> dict:
    name, info = await get_state(request).resolve_model(model)
    card = ModelCard(id=name, created=request.app.state.started, max_model_len=info.max_model_len)
    return card.model_dump()
