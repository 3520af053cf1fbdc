"""Racing decoder work against the HTTP client going away.

Uvicorn only reports a disconnect through ``receive()``; a handler that is busy awaiting the
decoder would not notice until it writes. ``until_disconnect`` awaits the work and the disconnect
together and cancels the work when the client leaves, so the caller can cancel the gRPC call
(which frees the request's KV cache in the decoder).
Not here: the streaming phase (the SSE response watches for disconnects itself).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client closed the connection before the answer was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientDisconnected
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # Let the cancellation run its cleanup before the caller cancels the gRPC call.
            await asyncio.gather(task, return_exceptions=True)
