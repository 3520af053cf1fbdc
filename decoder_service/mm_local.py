"""In-process media -> embeddings for the offline path (``glimpse generate``).

Contract: ``prepare_prompt(processor, tower, prompt, images, videos)`` renders the prompt with
the checkpoint's chat template as a single user turn (images, then videos, then the text),
decodes and preprocesses each file with the model's own processor, runs every item through the
vision tower in one batch, expands the placeholders and computes the 3-D positions. It returns
what ``LLMEngine.add_request`` takes. Each item's content hash covers its preprocessed pixels and
grid, so equal hashes mean equal embeddings. The serving path gets embeddings from the encoder
service instead; nothing here is used there.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from decoder_service.engine.request import MediaItem
from models.glm4v.processing.image import VisionInput
from models.glm4v.processing.processor import MultimodalProcessor


class PreparedPrompt(NamedTuple):
    prompt_token_ids: list[int]
    mm_items: list[MediaItem]  # with embeddings, in prompt order
    positions: torch.Tensor  # [3, P] int64
    rope_delta: int


def load_media(
    processor: MultimodalProcessor, images: Sequence[str | Path], videos: Sequence[str | Path]
) -> list[VisionInput]:
    """Decode and preprocess files; raises ``MediaError`` subclasses for bad content."""
    items = [processor.image_from_bytes(Path(p).read_bytes()) for p in images]
    items += [processor.video_from_bytes(Path(p).read_bytes()) for p in videos]
    return items


def content_hash(item: VisionInput) -> str:
    h = hashlib.sha256(repr((item.modality, tuple(item.grid_thw))).encode())
    h.update(item.pixel_values.contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.inference_mode()
def encode(tower: torch.nn.Module, items: Sequence[VisionInput]) -> list[torch.Tensor]:
    """One tower call for all items; returns [num_tokens, H] per item."""
    if not items:
        return []
    pixels = torch.cat([it.pixel_values for it in items]).to(tower.device, tower.dtype)
    grids = torch.tensor([list(it.grid_thw) for it in items], dtype=torch.long, device=tower.device)
    out = tower(pixels, grids)
    return list(out.split([it.num_tokens for it in items]))


def prepare_prompt(
    processor: MultimodalProcessor,
    tower: torch.nn.Module | None,
    prompt: str,
    images: Sequence[str | Path] = (),
    videos: Sequence[str | Path] = (),
    enable_thinking: bool | None = None,
) -> PreparedPrompt:
    media = load_media(processor, images, videos)
    content = [{"type": it.modality, it.modality: "local"} for it in media]
    content.append({"type": "text", "text": prompt})
    processed = processor.process(
        [{"role": "user", "content": content}], media, enable_thinking=enable_thinking
    )
    if media and tower is None:
        raise ValueError("media given but the model was built without its vision tower")
    embeds = encode(tower, media) if media else []
    items = [
        MediaItem(content_hash(vi), spans.spans, vi.modality, emb)
        for vi, spans, emb in zip(media, processed.tokens.media, embeds, strict=True)
    ]
    rope = processed.rope
    return PreparedPrompt(processed.tokens.token_ids, items, rope.positions, int(rope.rope_delta))
