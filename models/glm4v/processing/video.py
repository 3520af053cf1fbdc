"""Video frame sampling and preprocessing for GLM-4.5V / GLM-4.6V.

Contract:
- ``sample_frames(meta, sampling)`` -> source frame indices (even count, at least 2) under one of two
  policies, matching transformers' ``sample_frames``:
  GLM-4.5V (``Glm4vVideoProcessor``): ``fps`` (default 2) samples per second for videos up to
  ``max_duration`` seconds, else ``max_duration*fps`` samples spread over the whole video.
  GLM-4.6V (``Glm46VVideoProcessor``): target fps 3 / 1 / 0.5 for videos up to 30 s / 300 s /
  longer (duration capped at 2400 s), ``min(duration*fps*2, 640)`` frames taken by walking the
  frames every 1/(2*fps) s, falling back to evenly spaced indices.
  Both drop duplicate indices and repeat the last index to make the count even. A per-request
  ``fps`` replaces the policy's target fps; ``max_frames`` thins the result evenly (serving limits
  transformers does not have).
- ``preprocess_video(frames, frame_indices, fps, limits)`` resizes all frames jointly
  (``smart_resize`` over T frames), normalises and patchifies them in (grid_t, h/2, w/2, 2, 2)
  order, and attaches one timestamp (seconds) per temporal patch: the first frame of each pair.

Not here: decoding (``media.py``), prompt text for timestamps (``prompt.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from models.glm4v.errors import VideoDecodeError
from models.glm4v.processing.image import (
    VisionInput,
    normalize_patches,
    patch_layout,
    resize_uint8,
    smart_resize,
)
from models.glm4v.processing.processor_config import POLICY_46V, ImageLimits, VideoSampling

_MAX_DURATION_46V = 2400.0
_MAX_FRAMES_46V = 640
_DEFAULT_FPS_45V = 2.0


class VideoMeta(NamedTuple):
    fps: float  # native frames per second
    total_frames: int
    duration: float  # seconds


def sample_frames(
    meta: VideoMeta, sampling: VideoSampling, temporal_patch_size: int = 2
) -> list[int]:
    if meta.total_frames <= 0 or not meta.fps or meta.fps <= 0:
        raise VideoDecodeError("video has no frames or no frame rate")
    duration = meta.duration or round((meta.total_frames - 1) / meta.fps) + 1
    if sampling.policy == POLICY_46V:
        indices = _sample_46v(meta, duration, sampling.fps, temporal_patch_size)
    else:
        indices = _sample_45v(meta, duration, sampling)
    uniq = list(dict.fromkeys(int(i) for i in indices)) or [0]
    if sampling.max_frames is not None and len(uniq) > sampling.max_frames:
        keep = max(temporal_patch_size, sampling.max_frames - sampling.max_frames % 2)
        picks = np.linspace(0, len(uniq) - 1, keep).round().astype(int)
        uniq = [uniq[i] for i in dict.fromkeys(picks.tolist())]
    if len(uniq) % 2:
        uniq.append(uniq[-1])
    return uniq


def _sample_45v(meta: VideoMeta, duration: float, sampling: VideoSampling) -> list[int]:
    fps = sampling.fps or _DEFAULT_FPS_45V
    last = meta.total_frames - 1
    if duration <= sampling.max_duration:
        n = max(int(math.floor(duration * fps)), 1)
        return [min(last, int(math.ceil(i * meta.fps / fps))) for i in range(n)]
    num_samples = int(sampling.max_duration * fps)
    if num_samples >= meta.total_frames:
        return list(range(meta.total_frames))
    seconds = np.linspace(0, duration, num_samples, endpoint=True)
    return [min(last, int(math.ceil(t * meta.fps))) for t in seconds]


def _sample_46v(
    meta: VideoMeta, duration: float, fps_override: float | None, temporal_patch_size: int
) -> list[int]:
    total = meta.total_frames
    effective = min(duration, _MAX_DURATION_46V)
    if fps_override:
        target_fps = fps_override
    elif effective <= 30:
        target_fps = 3.0
    elif effective <= 300:
        target_fps = 1.0
    else:
        target_fps = 0.5
    want = min(int(effective * target_fps * temporal_patch_size), _MAX_FRAMES_46V)
    if total < want:
        indices = np.linspace(0, total - 1, want, dtype=int).tolist()
    else:
        indices, next_second, step = [], 0.0, 1 / (temporal_patch_size * target_fps)
        frame_seconds = 1 / meta.fps
        stop = int(duration)
        for i in range(total):
            if i * frame_seconds >= next_second:
                next_second += step
                indices.append(i)
                if next_second >= stop:
                    break
    if len(indices) < want:
        start, end = (indices[0], indices[-1]) if indices else (0, max(total - 1, 0))
        indices = np.linspace(start, end, want, dtype=int).tolist()
    elif len(indices) > want:
        indices = np.linspace(0, total - 1, want, dtype=int).tolist()
    return indices


def frame_timestamps(
    frame_indices: Sequence[int], fps: float, temporal_patch_size: int = 2
) -> list[float]:
    """Seconds of the first frame of each temporal patch."""
    return [i / fps for i in frame_indices[::temporal_patch_size]]


def preprocess_video(
    frames: Sequence[np.ndarray] | np.ndarray,  # F x [H, W, 3] uint8, the sampled frames in order
    frame_indices: Sequence[int],  # source index of each frame (len F)
    fps: float,  # native fps, for timestamps
    limits: ImageLimits,
    normalized: bool = True,  # False: uint8 ``pixel_values`` (see ``preprocess_rgb``)
) -> VisionInput:
    if len(frames) == 0 or len(frames) != len(frame_indices):
        raise VideoDecodeError("video has no frames to process")
    stack = torch.from_numpy(np.stack([np.asarray(f) for f in frames]))  # [F, H, W, 3]
    video = stack.permute(0, 3, 1, 2)  # [F, 3, H, W] uint8, channels-last (the fast resize)
    indices = list(frame_indices)
    tp = limits.temporal_patch_size
    if pad := -video.shape[0] % tp:
        video = torch.cat((video, video[-1:].expand(pad, -1, -1, -1)))
        indices += [indices[-1]] * pad
    height, width = video.shape[-2:]
    rh, rw = smart_resize(
        video.shape[0], height, width, limits.factor, limits.min_pixels, limits.max_pixels, tp
    )
    patches, gt, gh, gw = patch_layout(resize_uint8(video, rh, rw).contiguous(), limits)
    if normalized:
        patches = normalize_patches(patches, limits)
    return VisionInput(
        pixel_values=patches,
        grid_thw=(gt, gh, gw),
        modality="video",
        merge_size=limits.merge_size,
        timestamps=frame_timestamps(indices, fps, tp),
        frame_indices=indices,
    )
