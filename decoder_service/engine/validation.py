"""Admission checks: everything about a request a caller controls, checked before it is queued.

Contract: ``RequestValidator.check(...)`` raises the typed ``InvalidRequestError`` subclass that
names the problem (prompt too long, too many media, spans or embeddings that do not match the
prompt, a request that needs more KV blocks than the whole pool, invalid sampling values) and
otherwise returns nothing. It holds only limits, never engine state, so a failed check cannot
disturb requests in flight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from decoder_service.engine.config import MediaLimits
from decoder_service.engine.errors import (
    InvalidRequestError,
    KVCapacityError,
    MediaSpanError,
    PromptTooLongError,
    TooManyMediaError,
)
from decoder_service.engine.request import MediaItem
from decoder_service.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestValidator:
    vocab_size: int
    hidden_size: int
    max_model_len: int
    media: MediaLimits
    num_blocks: int
    block_size: int
    has_tokenizer: bool

    def check(
        self,
        prompt: list[int],
        params: SamplingParams,
        items: list[MediaItem],
        mrope_positions: torch.Tensor | None,  # [3, P] int64
    ) -> None:
        if not prompt:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise InvalidRequestError(
                f"prompt token ids must be in [0, {self.vocab_size})", "prompt"
            )
        params.validate(self.vocab_size)
        if params.stop and not self.has_tokenizer:
            raise InvalidRequestError("stop strings need a tokenizer", "stop")
        if len(prompt) + 1 > self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(prompt)} tokens; max_model_len {self.max_model_len} leaves no "
                "room for a generated token",
                "prompt",
            )
        self._check_media(prompt, items)
        if mrope_positions is not None and tuple(mrope_positions.shape) != (3, len(prompt)):
            raise InvalidRequestError(
                f"mrope_positions must be [3, {len(prompt)}], got {list(mrope_positions.shape)}",
                "prompt",
            )
        total = min(len(prompt) + params.max_tokens, self.max_model_len)
        needed = -(-total // self.block_size)
        if needed > self.num_blocks:
            raise KVCapacityError(
                f"prompt + max_tokens = {total} tokens need {needed} KV blocks; the pool holds "
                f"{self.num_blocks}",
                "max_tokens",
            )

    def _check_media(self, prompt: list[int], items: list[MediaItem]) -> None:
        for modality, limit in (("image", self.media.max_images), ("video", self.media.max_videos)):
            count = sum(1 for it in items if it.modality == modality)
            if count > limit:
                raise TooManyMediaError(
                    f"{count} {modality}s in the prompt; the limit is {limit}", "messages"
                )
        prev_end = 0
        for item in items:  # sorted by offset
            if item.modality not in ("image", "video") or not item.spans:
                raise MediaSpanError(f"bad media item {item.content_hash!r}", "mm_items")
            for a, b in item.spans:
                if not prev_end <= a < b <= len(prompt):
                    raise MediaSpanError(
                        f"media span [{a}, {b}) overlaps another or leaves the prompt", "mm_items"
                    )
                prev_end = b
            if item.embeds is not None:
                self.check_embeds(item, item.embeds)

    def check_embeds(self, item: MediaItem, embeds: torch.Tensor) -> None:
        if tuple(embeds.shape) != (item.num_embeds, self.hidden_size):
            raise MediaSpanError(
                f"media {item.content_hash!r} covers {item.num_embeds} tokens; got embeddings "
                f"{list(embeds.shape)}, expected [{item.num_embeds}, {self.hidden_size}]",
                "mm_items",
            )
