"""A fake OpenAI-compatible chat server that streams on a script, for the bench tests.

Contract: ``start_fake_server()`` runs it in a daemon thread on a free local port and returns
``(FakeServer, stop)``. ``FakeServer.behaviour`` sets how each request is answered (delay before
the first output chunk, gap between chunks, chunk count, tokens reported in ``usage``, which
requests fail with HTTP 500 or stall); ``seen`` records each request's headers and JSON body and
``peak`` the most requests it streamed at once. ``GET /v1/models`` lists ``fake-model`` first.

Not here: any assertion (the tests hold those).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class Behaviour:
    ttft_s: float = 0.02  # before the first output chunk (the role chunk goes out at once)
    gap_s: float = 0.01  # between output chunks
    chunks: int = 3
    tokens_per_chunk: int = 1  # usage reports chunks * tokens_per_chunk
    send_usage: bool = True
    prompt_tokens: int = 42
    fail_every: int = 0  # the k-th, 2k-th, ... request answers HTTP 500
    stall_every: int = 0  # the k-th, 2k-th, ... request stops after its first chunk


@dataclass
class FakeServer:
    url: str = ""
    behaviour: Behaviour = field(default_factory=Behaviour)
    seen: list[tuple[dict, dict]] = field(default_factory=list)  # (headers, payload)
    in_flight: int = 0
    peak: int = 0
    # A stream still open from an earlier test (a stalled one) must not touch the new counts.
    generation: int = 0

    def reset(self, **behaviour: object) -> None:
        self.behaviour = Behaviour(**behaviour)
        self.seen.clear()
        self.in_flight = self.peak = 0
        self.generation += 1


def _fake_app(state: FakeServer) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model"}, {"id": "other"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        payload = await request.json()
        state.seen.append((dict(request.headers), payload))
        number, b, generation = len(state.seen), state.behaviour, state.generation
        if b.fail_every and number % b.fail_every == 0:
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
        state.in_flight += 1
        state.peak = max(state.peak, state.in_flight)

        def sse(delta: dict, usage: dict | None = None) -> str:
            choices = [] if usage else [{"index": 0, "delta": delta}]
            return f"data: {json.dumps({'choices': choices, 'usage': usage})}\n\n"

        async def stream():
            try:
                yield sse({"role": "assistant"})
                await asyncio.sleep(b.ttft_s)
                for i in range(b.chunks):
                    if i:
                        await asyncio.sleep(b.gap_s)
                    text = "x " * b.tokens_per_chunk
                    yield sse({"reasoning_content": text} if i == 0 else {"content": text})
                    if b.stall_every and number % b.stall_every == 0:
                        await asyncio.sleep(30)
                if b.send_usage:
                    done = b.chunks * b.tokens_per_chunk
                    yield sse({}, {"prompt_tokens": b.prompt_tokens, "completion_tokens": done})
                yield "data: [DONE]\n\n"
            finally:
                if generation == state.generation:
                    state.in_flight -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def start_fake_server() -> tuple[FakeServer, Callable[[], None]]:
    state = FakeServer()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    state.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(
        _fake_app(state), log_level="warning", lifespan="off", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("fake server did not start")

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)

    return state, stop
