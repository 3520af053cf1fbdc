"""One generation's lifetime on the gateway: admission slot, gRPC call, and their release.

``Generation.start`` takes an admission slot (429 when full) and starts the Generate call;
``close()`` cancels the call (a no-op once it finished) and frees the slot, exactly once, however
the request ends. ``collect`` drains a call for non-streamed answers.
Not here: HTTP formatting (routes/, streaming.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from fastapi.responses import Response

from gateway.decoder_client import GenerateStream
from gateway.errors import DecoderError
from gateway.responses import TokenLogprob, Usage
from gateway.state import GatewayState

# Status recorded (and sent, to nobody) when the client left: nginx's "client closed request".
CLIENT_CLOSED = 499


class Generation:
    def __init__(self, state: GatewayState, stream: GenerateStream) -> None:
        self._state = state
        self.stream = stream
        self._closed = False

    @classmethod
    def start(cls, state: GatewayState, request: object) -> Generation:
        state.admission.acquire()
        state.metrics.in_flight.inc()
        stream = state.client.generate(request, timeout=state.config.request_timeout)
        return cls(state, stream)

    def close(self, *, disconnected: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self.stream.cancel()
        self._state.admission.release()
        self._state.metrics.in_flight.dec()
        if disconnected:
            self._state.metrics.client_disconnects.inc()


@dataclass
class Collected:
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = ""
    usage: Usage | None = None


async def collect(stream: GenerateStream) -> Collected:
    out, parts = Collected(), []
    async for chunk in stream:
        parts.append(chunk.text)
        out.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            out.text, out.finish_reason, out.usage = (
                "".join(parts),
                chunk.finish_reason,
                chunk.usage,
            )
            return out
    raise ended_early()


def ended_early() -> DecoderError:
    return DecoderError(
        grpc.StatusCode.INTERNAL, "the decoder stream ended without a finish reason"
    )


def disconnected_response() -> Response:
    return Response(status_code=CLIENT_CLOSED)
