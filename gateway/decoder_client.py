"""Async gRPC client of the decoder service: one channel, deadlines, cancellation, readiness.

``DecoderClient`` owns the channel. ``wait_until_ready`` (started in the background at startup)
waits with ``wait_for_ready`` until the decoder answers GetModelInfo; request-path calls fail fast
instead (an unreachable decoder is a 503, not a hang). ``generate`` returns a ``GenerateStream``
whose ``cancel()`` cancels the gRPC call, which the decoder sees as an abort that frees the
request's KV cache; every caller must cancel or exhaust it. Non-OK statuses surface as
``DecoderError`` for errors.py to map.
Not here: protobuf construction (convert.py), HTTP concerns (routes/, streaming.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2_grpc

from gateway import convert
from gateway.convert import DecodedChunk, ModelInfo
from gateway.errors import DecoderError
from protos import decoder_pb2_grpc

log = logging.getLogger(__name__)

_MODEL_INFO_TIMEOUT_S = 5.0
_HEALTH_TIMEOUT_S = 2.0
_READY_POLL_S = 0.5  # between GetModelInfo tries while the decoder is loading
_FRAMING_SLACK = 1024 * 1024


class GenerateStream:
    """One in-flight Generate call; iterate for chunks, ``cancel()`` to abort it."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self._call = call

    def __aiter__(self) -> AsyncIterator[DecodedChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[DecodedChunk]:
        try:
            async for msg in self._call:
                yield convert.chunk(msg)
        except grpc.aio.AioRpcError as exc:
            raise DecoderError(exc.code(), exc.details() or "") from None

    def cancel(self) -> None:
        self._call.cancel()


class DecoderClient:
    def __init__(self, target: str, *, max_message_bytes: int) -> None:
        limit = max_message_bytes + _FRAMING_SLACK
        self._channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                # Reconnect quickly after a decoder restart; the default backoff grows to 2 min.
                ("grpc.initial_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self._stub = decoder_pb2_grpc.DecoderStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._info: ModelInfo | None = None

    async def close(self) -> None:
        await self._channel.close()

    async def wait_until_ready(self, timeout: float) -> ModelInfo | None:
        """Wait until the decoder answers GetModelInfo; None when it never did within ``timeout``.

        ``wait_for_ready`` covers a decoder that is not listening yet; a decoder that listens
        but is still loading answers UNAVAILABLE at once, so that case is polled.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            try:
                return await self._fetch_info(timeout=max(left, 0.01), wait_for_ready=True)
            except DecoderError as exc:
                if exc.code != grpc.StatusCode.UNAVAILABLE or left <= _READY_POLL_S:
                    log.warning("decoder not ready after %.0fs: %s", timeout, exc.code.name)
                    return None
            await asyncio.sleep(_READY_POLL_S)

    async def model_info(self) -> ModelInfo:
        """The served model's description (cached after the first success)."""
        if self._info is not None:
            return self._info
        return await self._fetch_info(timeout=_MODEL_INFO_TIMEOUT_S, wait_for_ready=False)

    async def _fetch_info(self, *, timeout: float, wait_for_ready: bool) -> ModelInfo:
        try:
            msg = await self._stub.GetModelInfo(
                convert.model_info_request(), timeout=timeout, wait_for_ready=wait_for_ready
            )
        except grpc.aio.AioRpcError as exc:
            raise DecoderError(exc.code(), exc.details() or "") from None
        self._info = convert.model_info(msg)
        return self._info

    async def is_serving(self) -> bool:
        """True when the decoder's health service reports SERVING right now."""
        try:
            reply = await self._health.Check(
                convert.health_request(), timeout=_HEALTH_TIMEOUT_S, wait_for_ready=False
            )
        except grpc.aio.AioRpcError as exc:
            log.debug("decoder health check failed: %s", exc.code().name)
            return False
        return convert.is_serving(reply)

    def generate(self, request: object, *, timeout: float) -> GenerateStream:
        """Start a Generate call for a request built by ``convert`` (fails fast if unreachable)."""
        call = self._stub.Generate(request, timeout=timeout, wait_for_ready=False)
        return GenerateStream(call)
