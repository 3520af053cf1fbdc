"""Processor settings of a checkpoint: pixel budgets, patch geometry, normalisation, video policy.

Contract: ``load_processor_config(model_dir)`` reads ``preprocessor_config.json`` (images),
``video_preprocessor_config.json`` (videos) and the processor class name (from
``processor_config.json`` / the preprocessor files / ``tokenizer_config.json``) and returns a frozen
``ProcessorConfig``. Missing files or keys fall back to the defaults transformers uses for
``Glm4vImageProcessor`` / ``Glm4vVideoProcessor``. The video policy (GLM-4.5V fixed-fps sampling and
integer timestamps, or GLM-4.6V dynamic-fps sampling and "x.y seconds" timestamps) follows the
checkpoint's video processor / processor class.

Not here: any pixel math (``image.py``, ``video.py``) or the chat template (``prompt.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from models.glm4v.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

POLICY_45V = "glm4.5v"
POLICY_46V = "glm4.6v"
_POLICY_BY_CLASS = {
    "Glm4vVideoProcessor": POLICY_45V,
    "Glm4vProcessor": POLICY_45V,
    "Glm46VVideoProcessor": POLICY_46V,
    "Glm46VProcessor": POLICY_46V,
}


@dataclass(frozen=True)
class ImageLimits:
    """How one image (or each frame of a video) is resized, normalised and cut into patches."""

    min_pixels: int = 112 * 112  # lower bound on T*H*W after resize (T = temporal patch size)
    max_pixels: int = 28 * 28 * 15000  # upper bound on T*H*W after resize
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255

    @property
    def factor(self) -> int:
        """Side lengths are multiples of this (one merged token covers factor x factor pixels)."""
        return self.patch_size * self.merge_size


@dataclass(frozen=True)
class VideoSampling:
    """Which frames of a video are kept and how their timestamps are written in the prompt."""

    policy: str = POLICY_45V  # POLICY_45V or POLICY_46V
    fps: float | None = None  # target sampling fps; None = the policy's default
    max_duration: float = 300.0  # GLM-4.5V: longer videos get a fixed number of samples
    max_frames: int | None = None  # cap on sampled frames (a serving limit, not in transformers)

    def with_overrides(
        self, fps: float | None = None, max_frames: int | None = None
    ) -> VideoSampling:
        """Per-request overrides; None keeps the checkpoint's value."""
        return replace(
            self,
            fps=self.fps if fps is None else float(fps),
            max_frames=self.max_frames if max_frames is None else int(max_frames),
        )


@dataclass(frozen=True)
class ProcessorConfig:
    image: ImageLimits = field(default_factory=ImageLimits)
    video: ImageLimits = field(
        default_factory=lambda: ImageLimits(min_pixels=112 * 112, max_pixels=28 * 28 * 2 * 30000)
    )
    sampling: VideoSampling = field(default_factory=VideoSampling)
    # how frame timestamps are written in the prompt; follows the processor class, which normally
    # agrees with the video processor: GLM-4.5V "3", GLM-4.6V "3.0 seconds"
    timestamp_policy: str = POLICY_45V


def load_processor_config(model_dir: str | Path) -> ProcessorConfig:
    root = Path(model_dir)
    image_raw = _read_json(root / "preprocessor_config.json")
    video_raw = _read_json(root / "video_preprocessor_config.json")
    defaults = ProcessorConfig()
    image = _limits(image_raw, defaults.image)
    video = _limits(video_raw, defaults.video)
    policy = _policy(
        root, [video_raw.get("video_processor_type"), video_raw.get("processor_class")]
    )
    timestamp_policy = _policy(root, [], default=policy)
    sampling = VideoSampling(
        policy=policy,
        fps=_opt_float(video_raw.get("fps")) if policy == POLICY_45V else None,
        max_duration=float(video_raw.get("max_duration") or VideoSampling.max_duration),
    )
    return ProcessorConfig(
        image=image, video=video, sampling=sampling, timestamp_policy=timestamp_policy
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path.name} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path.name} must hold a JSON object")
    return raw


def _limits(raw: dict[str, Any], default: ImageLimits) -> ImageLimits:
    size = raw.get("size") or {}
    # older configs spell the budget as top-level min_pixels / max_pixels
    min_pixels = size.get("shortest_edge", raw.get("min_pixels", default.min_pixels))
    max_pixels = size.get("longest_edge", raw.get("max_pixels", default.max_pixels))
    try:
        limits = ImageLimits(
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            patch_size=int(raw.get("patch_size", default.patch_size)),
            temporal_patch_size=int(raw.get("temporal_patch_size", default.temporal_patch_size)),
            merge_size=int(raw.get("merge_size", default.merge_size)),
            image_mean=_triple(raw.get("image_mean"), default.image_mean),
            image_std=_triple(raw.get("image_std"), default.image_std),
            rescale_factor=float(raw.get("rescale_factor", default.rescale_factor)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"malformed processor config: {exc}") from exc
    if limits.min_pixels <= 0 or limits.max_pixels < limits.min_pixels:
        raise ConfigError(f"bad pixel budget [{limits.min_pixels}, {limits.max_pixels}]")
    return limits


def _triple(value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if value is None:
        return default
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    a, b, c = (float(v) for v in value)
    return (a, b, c)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _policy(root: Path, first: list[Any], default: str = POLICY_45V) -> str:
    """The policy named first by ``first`` then by the processor class; else ``default``."""
    candidates = list(first)
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        candidates.append(_read_json(root / name).get("processor_class"))
    for name in candidates:
        if name in _POLICY_BY_CLASS:
            return _POLICY_BY_CLASS[name]
    return default
