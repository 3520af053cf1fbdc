"""Placeholder expansion: rendered prompt text + per-media grids -> token ids and media spans.

Contract: ``PlaceholderExpander.expand(text, items)`` tokenises ``text`` (the chat template output,
already carrying its own prefix tokens, so no special tokens are added) and replaces the i-th
``<|image|>`` / ``<|video|>`` placeholder with the tokens of ``items[i]``, exactly as transformers'
``Glm4vProcessor`` / ``Glm46VProcessor`` do:
- image (t, h, w): ``<|image|>`` x t*h*w/merge**2;
- video (t, h, w): for each temporal patch k: ``<|begin_of_image|>`` + ``<|image|>`` x h*w/merge**2 +
  ``<|end_of_image|>`` + the timestamp text (GLM-4.5V ``str(int(ts))``, GLM-4.6V
  ``f"{ts:.1f} seconds"``); frames reuse the image token id and ``<|video|>`` disappears.
Each item's ``MediaSpans`` lists the token ranges of its ``<|image|>`` runs (one for an image, one
per temporal patch for a video), so images and videos can be mixed in one prompt and the engine
knows where each embedding row goes.

Not here: the chat template (``prompt.py``), 3-D positions (``rope_index.py``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from tokenizers import Tokenizer

from models.glm4v.errors import ConfigError
from models.glm4v.processing.processor_config import POLICY_46V
from models.glm4v.processing.prompt import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, PromptError

_PLACEHOLDER_RE = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


class MediaLike(Protocol):
    """What expansion needs of a media item (``VisionInput`` or an encoder's descriptor)."""

    modality: str  # "image" or "video"
    grid_thw: tuple[int, int, int]
    timestamps: Sequence[float]  # videos: seconds per temporal patch


@dataclass(frozen=True)
class MediaSpans:
    modality: str
    grid_thw: tuple[int, int, int]
    spans: tuple[tuple[int, int], ...]  # [start, end) of each <|image|> run, in order

    @property
    def num_tokens(self) -> int:
        return sum(e - s for s, e in self.spans)


@dataclass(frozen=True)
class PromptTokens:
    token_ids: list[int]
    media: list[MediaSpans]  # one per media item, in prompt order


@dataclass(frozen=True)
class SpecialTokenIds:
    image: int
    begin_image: int
    end_image: int
    video: int
    begin_video: int
    end_video: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> SpecialTokenIds:
        names = {
            "image": "<|image|>",
            "begin_image": "<|begin_of_image|>",
            "end_image": "<|end_of_image|>",
            "video": "<|video|>",
            "begin_video": "<|begin_of_video|>",
            "end_video": "<|end_of_video|>",
        }
        ids = {k: tokenizer.token_to_id(v) for k, v in names.items()}
        missing = [names[k] for k, v in ids.items() if v is None]
        if missing:
            raise ConfigError(f"tokenizer lacks the GLM media tokens {missing}")
        return cls(**ids)


def timestamp_text(seconds: float, policy: str) -> str:
    return f"{seconds:.1f} seconds" if policy == POLICY_46V else str(int(seconds))


class PlaceholderExpander:
    def __init__(self, tokenizer: Tokenizer, timestamp_policy: str, merge_size: int = 2) -> None:
        self.tokenizer = tokenizer
        self.ids = SpecialTokenIds.from_tokenizer(tokenizer)
        self.timestamp_policy = timestamp_policy
        self.merge_size = merge_size

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def expand(self, text: str, items: Sequence[MediaLike]) -> PromptTokens:
        pieces = _PLACEHOLDER_RE.split(text)
        n_placeholders = len(pieces) // 2
        if n_placeholders != len(items):
            raise PromptError(
                f"prompt has {n_placeholders} media placeholders for {len(items)} items"
            )
        ids: list[int] = []
        media: list[MediaSpans] = []
        for k, piece in enumerate(pieces):
            if k % 2 == 0:
                ids += self.encode_text(piece)
                continue
            item = items[k // 2]
            expected = "image" if piece == IMAGE_PLACEHOLDER else "video"
            if item.modality != expected:
                raise PromptError(
                    f"media item {k // 2} is a {item.modality}, prompt wants {expected}"
                )
            media.append(self._append_item(ids, item))
        return PromptTokens(token_ids=ids, media=media)

    def _append_item(self, ids: list[int], item: MediaLike) -> MediaSpans:
        t, h, w = (int(v) for v in item.grid_thw)
        per_frame = h * w // self.merge_size**2
        spans = []
        if item.modality == "image":
            spans.append((len(ids), len(ids) + t * per_frame))
            ids += [self.ids.image] * (t * per_frame)
        else:
            stamps = list(item.timestamps)[:t]
            while len(stamps) < t:  # as the reference: repeat the last one (0 if none)
                stamps.append(stamps[-1] if stamps else 0.0)
            for ts in stamps:
                ids.append(self.ids.begin_image)
                spans.append((len(ids), len(ids) + per_frame))
                ids += [self.ids.image] * per_frame
                ids.append(self.ids.end_image)
                ids += self.encode_text(timestamp_text(ts, self.timestamp_policy))
        return MediaSpans(modality=item.modality, grid_thw=(t, h, w), spans=tuple(spans))
