"""Bearer API-key check, attached as a dependency of every protected router (deny by default).

The check runs on the route actually dispatched, never on a path prefix rebuilt from the ASGI
scope (RELIABILITY.md §3.1), and compares in constant time. A missing or wrong key is a 401 with
``WWW-Authenticate: Bearer`` and code ``invalid_api_key``. With no key configured it allows all.
Not here: which routes are protected (app.py decides by router).
"""

from __future__ import annotations

import hmac

from fastapi import Request

from gateway.errors import GatewayError


async def require_api_key(request: Request) -> None:
    expected = request.app.state.gateway.config.api_key
    if expected is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # NOTE: compare_digest on bytes: str arguments must be ASCII, and a client controls this one.
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode("utf-8"), expected.encode("utf-8")
    )
    if not ok:
        raise GatewayError(
            401,
            "missing or invalid API key; send `Authorization: Bearer <key>`",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
