"""``MultimodalProcessor``: one object holding a checkpoint's whole processor (like Glm4vProcessor).

Contract: ``MultimodalProcessor.from_pretrained(model_dir)`` loads the processor settings, the chat
template and ``tokenizer.json``. It exposes each stage separately, because in serving they run in
different processes (the decoder renders and expands, the encoder decodes and preprocesses):
``render`` (messages -> text + media refs), ``image_from_bytes`` / ``video_from_bytes`` /
``preprocess_image`` / ``preprocess_video`` (media -> ``VisionInput``), ``expand`` (text + media
grids -> token ids + spans) and ``rope_index``; ``process`` chains render, expand and rope index
for already preprocessed media.

Not here: any of the stage logic itself (the modules it imports), fetching media, the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tokenizers import Tokenizer

from models.glm4v.errors import ConfigError
from models.glm4v.processing.image import VisionInput, preprocess_image
from models.glm4v.processing.media import (
    DEFAULT_MAX_IMAGE_PIXELS,
    VideoLimits,
    decode_image,
    decode_video,
)
from models.glm4v.processing.placeholders import MediaLike, PlaceholderExpander, PromptTokens
from models.glm4v.processing.processor_config import ProcessorConfig, load_processor_config
from models.glm4v.processing.prompt import ChatTemplate, PromptError, RenderedPrompt
from models.glm4v.processing.rope_index import RopeIndex, get_rope_index
from models.glm4v.processing.video import preprocess_video


@dataclass(frozen=True)
class ProcessedPrompt:
    tokens: PromptTokens  # token ids + where each media item's embeddings go
    rope: RopeIndex  # [3, T] positions + delta for later tokens


class MultimodalProcessor:
    def __init__(
        self, config: ProcessorConfig, template: ChatTemplate, tokenizer: Tokenizer
    ) -> None:
        self.config = config
        self.template = template
        self.tokenizer = tokenizer
        self.expander = PlaceholderExpander(
            tokenizer, config.timestamp_policy, merge_size=config.image.merge_size
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> MultimodalProcessor:
        root = Path(model_dir)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise ConfigError(f"no tokenizer.json in {root}")
        return cls(
            load_processor_config(root),
            ChatTemplate.from_pretrained(root),
            Tokenizer.from_file(str(tok_file)),
        )

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> RenderedPrompt:
        return self.template.render(messages, tools, add_generation_prompt, enable_thinking)

    def preprocess_image(self, img: Image.Image) -> VisionInput:
        return preprocess_image(img, self.config.image)

    def image_from_bytes(
        self, data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ) -> VisionInput:
        return preprocess_image(decode_image(data, max_pixels), self.config.image)

    def preprocess_video(
        self, frames: Sequence[np.ndarray], frame_indices: Sequence[int], fps: float
    ) -> VisionInput:
        return preprocess_video(frames, frame_indices, fps, self.config.video)

    def video_from_bytes(
        self,
        data: bytes,
        fps: float | None = None,
        max_frames: int | None = None,
        limits: VideoLimits = VideoLimits(),
    ) -> VisionInput:
        sampling = self.config.sampling.with_overrides(fps=fps, max_frames=max_frames)
        video = decode_video(data, sampling, limits, self.config.video.temporal_patch_size)
        return preprocess_video(
            video.frames, video.frame_indices, video.meta.fps, self.config.video
        )

    def expand(self, text: str, items: Sequence[MediaLike]) -> PromptTokens:
        return self.expander.expand(text, items)

    def rope_index(self, tokens: PromptTokens) -> RopeIndex:
        return get_rope_index(len(tokens.token_ids), tokens.media, self.config.image.merge_size)

    def process(
        self,
        messages: list[dict[str, Any]],
        media: Sequence[MediaLike],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
    ) -> ProcessedPrompt:
        """Messages + their media, already preprocessed and in prompt order -> model inputs."""
        rendered = self.render(messages, tools, add_generation_prompt, enable_thinking)
        kinds = [m.modality for m in rendered.media]
        if kinds != [m.modality for m in media]:
            raise PromptError(f"messages hold media {kinds}, got {[m.modality for m in media]}")
        tokens = self.expand(rendered.text, media)
        return ProcessedPrompt(tokens=tokens, rope=self.rope_index(tokens))
