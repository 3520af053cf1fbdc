"""The image and video preprocessing's patch layout: ``patch_layout`` then
``normalize_patches`` on uint8 frames (any strides) equals ``patchify(normalize(...))`` on contiguous float frames, value for value, and the
channels-last resize equals the contiguous one, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.glm4v.processing.image import (
    normalize,
    normalize_patches,
    patch_layout,
    patchify,
    preprocess_image,
    resize_uint8,
    smart_resize,
)
from models.glm4v.processing.processor_config import ProcessorConfig
from models.glm4v.processing.video import preprocess_video

LIMITS = ProcessorConfig().image


def _old_image(rgb: np.ndarray) -> torch.Tensor:
    frame = torch.from_numpy(rgb).permute(2, 0, 1).contiguous().unsqueeze(0)
    tp = LIMITS.temporal_patch_size
    rh, rw = smart_resize(
        tp, *rgb.shape[:2], LIMITS.factor, LIMITS.min_pixels, LIMITS.max_pixels, tp
    )
    pixels = normalize(resize_uint8(frame, rh, rw).contiguous(), LIMITS)
    return patchify(pixels.expand(tp, -1, -1, -1), LIMITS)[0]


@pytest.mark.parametrize(
    ("height", "width"),
    [(56, 84), (97, 203), (30, 500), (640, 480), (1200, 1600)],
    ids=["no-resize", "odd", "upscaled", "vga", "large"],
)
def test_image_patches_equal_the_float_path(height: int, width: int) -> None:
    rgb = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), np.uint8)
    got = preprocess_image(Image.fromarray(rgb), LIMITS).pixel_values
    want = _old_image(rgb)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want)


def test_channels_last_resize_is_byte_identical() -> None:
    rgb = np.random.default_rng(3).integers(0, 256, (301, 457, 3), np.uint8)
    view = torch.from_numpy(rgb).unsqueeze(0).permute(0, 3, 1, 2)
    assert not view.is_contiguous()
    for size in ((140, 224), (616, 924)):  # down and up
        assert torch.equal(resize_uint8(view, *size), resize_uint8(view.contiguous(), *size))


def test_video_patches_equal_the_float_path() -> None:
    video_limits = ProcessorConfig().video
    frames = np.random.default_rng(5).integers(0, 256, (5, 90, 130, 3), np.uint8)  # odd count
    got = preprocess_video(list(frames), list(range(5)), 5.0, video_limits)
    stack = torch.from_numpy(np.concatenate([frames, frames[-1:]])).permute(0, 3, 1, 2)
    rh, rw = smart_resize(
        6, 90, 130, video_limits.factor, video_limits.min_pixels, video_limits.max_pixels, 2
    )
    pixels = normalize(resize_uint8(stack.contiguous(), rh, rw).contiguous(), video_limits)
    want, gt, gh, gw = patchify(pixels, video_limits)
    assert got.grid_thw == (gt, gh, gw) == (3, rh // 14, rw // 14)
    assert torch.equal(got.pixel_values, want)


def test_patch_layout_takes_expanded_frames() -> None:
    frames = torch.randint(0, 256, (1, 3, 56, 28), dtype=torch.uint8)
    expanded = frames.expand(2, -1, -1, -1)  # stride 0 over time
    patches, *grid = patch_layout(expanded, LIMITS)
    got = normalize_patches(patches, LIMITS)
    want, *want_grid = patchify(normalize(expanded.contiguous(), LIMITS), LIMITS)
    assert grid == want_grid and torch.equal(got, want)
