"""Chat messages -> engine prompt: template, media sent to encoders, placeholders, positions.

Contract: ``MediaDispatcher.prepare(chat, deadline)`` renders the checkpoint's chat template,
refuses too many images/videos before any encoder work, sends every media item to an encoder
replica (one Encode call per item, all in parallel, spread least-loaded over healthy replicas,
retried on another replica when one is UNAVAILABLE), expands the placeholders to the token
counts the encoders report and computes the 3-D M-RoPE positions. It returns a
``PreparedPrompt`` whose media items have no embeddings yet; ``fetch(prepared, attach,
deadline)`` then pulls each embedding from the replica that made it (its shm / CUDA IPC pool on
the same host, else a gRPC stream) and hands it to ``attach(index, tensor)``; ``release``
acknowledges embeddings that will never be fetched. Acks never hold up a request: a fetched
embedding's ack and every release are queued on the replica's client (``ack_later``), which
sends those of one loop turn as one Ack call and keeps them until answered. Encoder failures
become ``ServiceError``s that name the item (``invalid_image`` / ``invalid_video`` for bad
media, DEADLINE, queue_full, UNAVAILABLE).
Not here: the engine, protobuf of the decoder API, the encoders' own media rules (SSRF, local
paths, size caps: the encoder enforces them where it fetches).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from decoder_service.encoder_pool import EncoderPool, Replica
from decoder_service.engine.config import MediaLimits
from decoder_service.engine.request import MediaItem
from decoder_service.errors import (
    ServiceError,
    Status,
    internal,
    invalid,
    queue_full,
    unavailable,
)
from decoder_service.inputs import ChatRequest, MediaSource
from encoder_service.items import EmbeddingDescriptor, MediaOptions, Modality
from encoder_service.items import MediaItem as EncoderItem
from encoder_service.transport import TransportError
from models.glm4v.processing.processor import MultimodalProcessor
from models.glm4v.processing.prompt import PromptError

log = logging.getLogger(__name__)

_ENCODER_LABEL = re.compile(r"^item \d+")


@dataclass(frozen=True)
class _Grid:
    """What placeholder expansion needs of an encoded item (``MediaLike``)."""

    modality: str
    grid_thw: tuple[int, int, int]
    timestamps: tuple[float, ...]


@dataclass(frozen=True)
class Pending:
    index: int  # the item's position among the prompt's media
    replica: Replica
    descriptor: EmbeddingDescriptor


@dataclass
class PreparedPrompt:
    token_ids: list[int]
    mm_items: list[MediaItem]  # in prompt order, embeddings not attached yet
    positions: torch.Tensor | None  # [3, P] int64; None for text-only prompts
    rope_delta: int
    pending: list[Pending]  # one per media item, in the same order


class MediaDispatcher:
    def __init__(
        self, processor: MultimodalProcessor, pool: EncoderPool, limits: MediaLimits
    ) -> None:
        self.processor = processor
        self.pool = pool
        self.limits = limits

    async def prepare(self, chat: ChatRequest, deadline: float) -> PreparedPrompt:
        """``deadline`` is a ``time.monotonic()`` instant for all encoder work."""
        try:
            rendered = self.processor.render(
                chat.messages, chat.tools, enable_thinking=chat.enable_thinking
            )
        except PromptError as exc:
            raise invalid("invalid_messages", str(exc)) from None
        sources: list[MediaSource] = [m.source for m in rendered.media]
        self._check_counts(sources)
        if sources and not self.pool.enabled:
            raise invalid(f"invalid_{sources[0].modality}", "this server accepts text only")
        descriptors = await self._encode_all(sources, deadline)
        grids = [
            _Grid(d.descriptor.modality.value, d.descriptor.grid_thw, d.descriptor.timestamps)
            for d in descriptors
        ]
        try:
            tokens = self.processor.expand(rendered.text, grids)
        except PromptError as exc:
            self.release(descriptors)
            raise invalid("invalid_messages", str(exc)) from None
        items = [
            MediaItem(p.descriptor.content_hash, spans.spans, spans.modality)
            for p, spans in zip(descriptors, tokens.media, strict=True)
        ]
        positions, delta = None, 0
        if items:
            rope = self.processor.rope_index(tokens)
            positions, delta = rope.positions, int(rope.rope_delta)
        return PreparedPrompt(tokens.token_ids, items, positions, delta, descriptors)

    def _check_counts(self, sources: list[MediaSource]) -> None:
        for modality, limit in (
            ("image", self.limits.max_images),
            ("video", self.limits.max_videos),
        ):
            count = sum(1 for s in sources if s.modality == modality)
            if count > limit:
                raise invalid(
                    f"too_many_{modality}s",
                    f"{count} {modality}s in the request; at most {limit} are allowed",
                )

    async def _encode_all(self, sources: list[MediaSource], deadline: float) -> list[Pending]:
        tasks = [asyncio.create_task(self._encode(k, s, deadline)) for k, s in enumerate(sources)]
        try:
            results = await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:  # the caller went away: free what was already encoded
            self.release([t.result() for t in tasks if _succeeded(t)])
            raise
        done = [r for r in results if isinstance(r, Pending)]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            self.release(done)
            # a bad item is the most useful thing to report; infrastructure errors come after
            errors = [f for f in failures if isinstance(f, ServiceError)]
            bad = [e for e in errors if e.status == Status.INVALID]
            raise (bad or errors or failures)[0]
        return done

    async def _encode(self, index: int, source: MediaSource, deadline: float) -> Pending:
        modality = Modality(source.modality)
        item = EncoderItem(
            index=index,
            modality=modality,
            data=source.data,
            url=source.url if source.data is None else None,
            options=MediaOptions(fps=source.fps or 0.0, max_frames=source.max_frames or 0),
        )
        tried: set[str] = set()
        while True:
            replica = self.pool.pick(exclude=tried)
            if replica is None:
                raise unavailable("no encoder is available; retry later")
            tried.add(replica.target)
            try:
                with replica.busy():
                    (desc,) = await replica.client.encode([item], timeout=_remaining(deadline))
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    self.pool.mark_unhealthy(replica)
                    continue
                raise _encoder_error(err, index, source.modality) from None
            return Pending(index, replica, desc)

    async def fetch(
        self,
        prepared: PreparedPrompt,
        attach: Callable[[int, torch.Tensor], None],
        deadline: float,
    ) -> None:
        """Fetch every embedding in parallel; raises ``ServiceError`` if one cannot be read."""
        await asyncio.gather(*(self._fetch_one(p, attach, deadline) for p in prepared.pending))

    async def _fetch_one(
        self, p: Pending, attach: Callable[[int, torch.Tensor], None], deadline: float
    ) -> None:
        try:
            with p.replica.busy():
                # ack=True queues the ack once the tensor is here; a failed fetch is released
                # by the caller (the servicer releases every item that was not attached).
                embeds = await p.replica.client.fetch(
                    p.descriptor, timeout=_remaining(deadline), ack=True
                )
        except grpc.aio.AioRpcError as err:
            raise _encoder_error(err, p.index, p.descriptor.modality.value) from None
        except TransportError as exc:
            log.warning("embedding of item %d from %s: %s", p.index, p.replica.target, exc)
            raise unavailable(f"item {p.index}: the vision embedding was lost; retry") from None
        attach(p.index, embeds)

    def release(self, pending: list[Pending]) -> None:
        """Acknowledge embeddings that will not be fetched (queued, never awaited here)."""
        for p in pending:
            p.replica.client.ack_later([p.descriptor.embedding_id])


def _succeeded(task: asyncio.Task[Pending]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ServiceError(Status.DEADLINE, "deadline", "the media deadline passed")
    return left


def _encoder_error(err: grpc.aio.AioRpcError, index: int, modality: str) -> ServiceError:
    code = err.code()
    details = _ENCODER_LABEL.sub(f"item {index}", err.details() or "", count=1)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return invalid(f"invalid_{modality}", details or f"item {index}: invalid {modality}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServiceError(Status.DEADLINE, "deadline", f"item {index}: the {modality} timed out")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return queue_full("the encoders are busy; retry later")
    if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
        return unavailable(f"item {index}: the encoder lost the {modality}; retry")
    log.error("encoder call for item %d failed: %s %s", index, code.name, err.details())
    return internal(f"item {index}: the encoder failed")
