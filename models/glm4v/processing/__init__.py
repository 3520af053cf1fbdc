"""GLM-4.5V / GLM-4.6V processor: media decoding, pixel preprocessing, prompts, 3-D positions.

Contract: re-exports the public entry points of the modules in this package; each module's own
docstring states its contract. One implementation serves both the encoder (media -> pixels) and
the decoder (messages -> token ids, spans, positions). Nothing here touches model weights.
"""

from __future__ import annotations

from models.glm4v.processing.image import VisionInput, preprocess_image, smart_resize
from models.glm4v.processing.media import (
    DecodedVideo,
    VideoLimits,
    decode_image,
    decode_video,
)
from models.glm4v.processing.placeholders import (
    MediaSpans,
    PlaceholderExpander,
    PromptTokens,
    timestamp_text,
)
from models.glm4v.processing.processor import MultimodalProcessor, ProcessedPrompt
from models.glm4v.processing.processor_config import (
    POLICY_45V,
    POLICY_46V,
    ImageLimits,
    ProcessorConfig,
    VideoSampling,
    load_processor_config,
)
from models.glm4v.processing.prompt import ChatTemplate, MediaRef, PromptError, RenderedPrompt
from models.glm4v.processing.rope_index import RopeIndex, get_rope_index, positions_after
from models.glm4v.processing.video import VideoMeta, preprocess_video, sample_frames

__all__ = [
    "POLICY_45V",
    "POLICY_46V",
    "ChatTemplate",
    "DecodedVideo",
    "ImageLimits",
    "MediaRef",
    "MediaSpans",
    "MultimodalProcessor",
    "PlaceholderExpander",
    "ProcessedPrompt",
    "ProcessorConfig",
    "PromptError",
    "PromptTokens",
    "RenderedPrompt",
    "RopeIndex",
    "VideoLimits",
    "VideoMeta",
    "VideoSampling",
    "VisionInput",
    "decode_image",
    "decode_video",
    "get_rope_index",
    "load_processor_config",
    "positions_after",
    "preprocess_image",
    "preprocess_video",
    "sample_frames",
    "smart_resize",
    "timestamp_text",
]
