"""Runs the single-threaded ``LLMEngine`` in one background thread and streams to asyncio.

Contract: ``EngineLoop(engine, ...)`` owns the engine; only its thread calls into it. Callers on
the event loop ``await submit(EngineRequest)`` (admission: raises the engine's
``InvalidRequestError`` unchanged) and get a ``RequestStream`` of ``StreamChunk``s, ending with
the chunk whose ``finish_reason`` is set (request_stream.py). ``attach`` (late media embeddings) and ``abort`` are
fire-and-forget and safe from any thread. The thread steps while work exists and sleeps on its
command queue otherwise (also while every request waits for media), so an idle server costs no
CPU. Outputs of one step reach the event loop in one ``call_soon_threadsafe``. The token that
ends a request (EOS or a stop token id) is trimmed from the text here. If a step raises, every
stream fails with INTERNAL, every submit still queued with UNAVAILABLE, and the loop stops
(``dead`` turns True; health goes NOT_SERVING).
Not here: protobuf, media fetching, metrics definitions (``on_step`` is a plain callback).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from decoder_service.engine.engine import EngineStats, LLMEngine, RequestOutput
from decoder_service.engine.errors import DuplicateRequestError, InvalidRequestError
from decoder_service.engine.request import MediaItem
from decoder_service.engine.sampling_params import SamplingParams
from decoder_service.errors import ServiceError, internal, unavailable
from decoder_service.request_stream import RequestStream, StreamChunk

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5  # how often an idle thread wakes to publish stats


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    mm_items: list[MediaItem] = field(default_factory=list)  # embeds may still be None
    mrope_positions: torch.Tensor | None = None  # [3, P] int64
    rope_delta: int = 0


@dataclass
class _Add:
    request: EngineRequest
    done: asyncio.Future[None]


@dataclass
class _Attach:
    request_id: str
    index: int
    embeds: torch.Tensor  # [n, H]


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        token_text: Callable[[int, bool], str],
        on_step: Callable[[EngineStats, list[RequestOutput]], None] | None = None,
    ) -> None:
        self.engine = engine
        self._token_text = token_text  # (token id, skip special) -> its text
        self._on_step = on_step
        self._commands: queue.SimpleQueue[_Add | _Attach | _Abort | _Stop] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # event-loop side only
        self._skip: dict[str, bool] = {}  # engine-thread side only
        self._generated: dict[str, int] = {}  # engine-thread side only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.dead = False
        self._closed = False  # stop() was called

    # ---- event-loop side ------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def num_active(self) -> int:
        return len(self._streams)

    def is_active(self, request_id: str) -> bool:
        return request_id in self._streams

    async def submit(self, request: EngineRequest) -> RequestStream:
        assert self._loop is not None, "start() first"
        if self.dead:
            raise unavailable("the engine stopped after an internal error")
        if self._closed:
            raise unavailable("the server is shutting down")
        if request.request_id in self._streams:
            # the engine would refuse it too; refusing here keeps the first stream intact
            raise DuplicateRequestError(f"request id {request.request_id!r} is in flight")
        stream = RequestStream(request.request_id)
        self._streams[request.request_id] = stream
        done = self._loop.create_future()
        self._commands.put(_Add(request, done))
        try:
            await done
        except BaseException:
            self._streams.pop(request.request_id, None)
            self.abort(request.request_id)  # harmless when admission failed; needed if cancelled
            raise
        return stream

    def attach(self, request_id: str, index: int, embeds: torch.Tensor) -> None:
        self._commands.put(_Attach(request_id, index, embeds))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def release(self, request_id: str) -> None:
        """The consumer is gone: stop routing outputs and abort the request if it still runs."""
        stream = self._streams.pop(request_id, None)
        if stream is not None and not stream.finished:
            self.abort(request_id)

    def fail(self, request_id: str, err: ServiceError) -> None:
        """End a stream with an error (e.g. its media could not be fetched) and abort it."""
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(err)
        self.abort(request_id)

    async def stop(self) -> None:
        self._closed = True
        self._commands.put(_Stop())
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)
        for stream in self._streams.values():
            stream.put(unavailable("the server is shutting down"))
        self._streams.clear()
        if self._thread is None or not self._thread.is_alive():
            self._refuse_queued(unavailable("the server is shutting down"))

    def _deliver(self, chunks: list[tuple[str, StreamChunk]]) -> None:
        for request_id, chunk in chunks:
            stream = self._streams.get(request_id)
            if stream is None:
                continue
            stream.put(chunk)
            if chunk.finish_reason is not None:
                del self._streams[request_id]

    def _fail_all(self, err: ServiceError) -> None:
        for stream in self._streams.values():
            stream.put(err)
        self._streams.clear()
        # submits whose requests the dead thread never took would otherwise wait forever
        self._refuse_queued(unavailable("the engine stopped after an internal error"))

    def _refuse_queued(self, err: ServiceError) -> None:
        """Event-loop side, once the engine thread no longer reads commands: every queued
        ``submit`` fails with ``err``; queued attaches and aborts have nothing left to do."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                _settle(command.done, err)

    # ---- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        stalled = False
        while True:
            block = stalled or not self.engine.has_unfinished_requests
            commands = self._take_commands(block)
            if any(isinstance(c, _Stop) for c in commands):
                for c in commands:
                    if isinstance(c, _Add):
                        self._call(_settle, c.done, unavailable("the server is shutting down"))
                return
            for command in commands:
                self._apply(command)
            if not self.engine.has_unfinished_requests:
                self._publish([])
                continue
            try:
                outputs = self.engine.step()
            except Exception:  # noqa: BLE001 - a failed step leaves the engine unusable
                launched = self.engine.last_launched
                # NOTE: CUDA reports a kernel's fault at a later call; CUDA_LAUNCH_BLOCKING=1
                # makes the traceback name the kernel
                log.exception(
                    "engine step failed (last step launched: %s); failing every request",
                    launched.describe() if launched is not None else "none",
                )
                self.dead = True
                self._call(self._fail_all, internal("the engine failed"))
                return
            stalled = self.engine.idle and not outputs and not commands
            if outputs:
                self._call(self._deliver, [self._chunk(o) for o in outputs])
            self._publish(outputs)

    def _take_commands(self, block: bool) -> list[_Add | _Attach | _Abort | _Stop]:
        out = []
        if block:
            try:
                out.append(self._commands.get(timeout=_IDLE_WAIT_S))
            except queue.Empty:
                return out
        while True:
            try:
                out.append(self._commands.get_nowait())
            except queue.Empty:
                return out

    def _apply(self, command: _Add | _Attach | _Abort) -> None:
        if isinstance(command, _Add):
            req = command.request
            try:
                self.engine.add_request(
                    req.request_id,
                    req.prompt_token_ids,
                    req.params,
                    req.mm_items,
                    req.mrope_positions,
                    req.rope_delta,
                )
            except Exception as exc:  # noqa: BLE001 - handed to the waiting caller, not swallowed
                self._call(_settle, command.done, exc)
                return
            self._skip[req.request_id] = req.params.skip_special_tokens
            self._generated[req.request_id] = 0
            self._call(_settle, command.done, None)
        elif isinstance(command, _Attach):
            if command.request_id in self.engine.scheduler.requests:
                try:
                    self.engine.attach_media(command.request_id, command.index, command.embeds)
                except InvalidRequestError as exc:  # the encoder sent a wrongly shaped tensor
                    log.error("media of %s rejected: %s", command.request_id, exc)
                    self.engine.abort_request(command.request_id)
                    err = internal("the vision embeddings did not match the prompt")
                    self._call(self.fail, command.request_id, err)
        else:
            self.engine.abort_request(command.request_id)

    def _chunk(self, out: RequestOutput) -> tuple[str, StreamChunk]:
        rid = out.request_id
        text = out.new_text
        count = self._generated.get(rid, 0) + len(out.new_token_ids)
        if out.finished:
            skip = self._skip.pop(rid, True)
            self._generated.pop(rid, None)
            if out.finish_reason == "stop" and not isinstance(out.stop_reason, str):
                # NOTE: EOS / stop-token text is kept in the detokenizer but never shown.
                ended_by = (
                    self._token_text(out.new_token_ids[-1], skip) if out.new_token_ids else ""
                )
                if ended_by and text.endswith(ended_by):
                    text = text[: -len(ended_by)]
        else:
            self._generated[rid] = count
        chunk = StreamChunk(out.new_token_ids, text, out.logprobs)
        if out.finished:
            chunk.finish_reason = out.finish_reason
            chunk.prompt_tokens = out.num_prompt_tokens
            chunk.completion_tokens = count
            chunk.cached_tokens = out.num_cached_tokens
        return rid, chunk

    def _publish(self, outputs: list[RequestOutput]) -> None:
        if self._on_step is not None:
            self._on_step(self.engine.stats(), outputs)

    def _call(self, fn, *args) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop closed under us during shutdown
            log.debug("event loop closed; dropping engine output")


def _settle(done: asyncio.Future[None], exc: BaseException | None) -> None:
    if done.done():
        return
    if exc is None:
        done.set_result(None)
    else:
        done.set_exception(exc)
