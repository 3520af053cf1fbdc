"""Image preprocessing for GLM-4.5V / GLM-4.6V: PIL image -> normalised patches in merge-block order.

Contract: ``preprocess_image(img, limits)`` returns a ``VisionInput`` whose ``pixel_values`` equal
what transformers' default ``Glm4vImageProcessor`` (torchvision backend) produces for the same
image: RGB conversion (transparency composited on white), ``smart_resize`` to multiples of 28,
antialiased bicubic resize of the uint8 image, (x - 255*mean) / (255*std) in float32, then patches
of (C, T=2, 14, 14) with the frame duplicated across T, ordered (h/2, w/2, 2, 2). ``smart_resize``
raises ``ImageSizeError`` for a zero-area image or an aspect ratio above 200.
The uint8 frames are laid out in patch order first (``patch_layout``) and normalised in that
layout (``normalize_patches``, which the encoder service runs on the tower's device): the same
arithmetic per value as ``normalize`` then ``patchify`` (which the demo renderer uses on float
frames) on a quarter of the bytes moved. Both are shared with ``video.py``. The resize reads the
decoded HWC array through a channels-last view (torch's fast uint8 path) and only its smaller or
equal output is made NCHW.

Not here: decoding bytes (``media.py``), frame sampling (``video.py``), token counting for prompts
beyond ``VisionInput.num_tokens``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.glm4v.errors import ImageSizeError
from models.glm4v.processing.processor_config import ImageLimits

MAX_ASPECT_RATIO = 200


@dataclass
class VisionInput:
    """One preprocessed image or video, ready for the vision tower."""

    # [t*h*w, C*T*P*P] float32, merge-block order (uint8, not yet normalised, where the
    # caller asked for ``normalized=False``)
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]  # (temporal patches, patch rows, patch cols)
    modality: str  # "image" or "video"
    merge_size: int = 2
    timestamps: list[float] = field(default_factory=list)  # videos: seconds, one per temporal patch
    frame_indices: list[int] = field(default_factory=list)  # videos: sampled source frames

    @property
    def num_tokens(self) -> int:
        """Embeddings the tower returns for this item (= placeholder tokens in the prompt)."""
        t, h, w = self.grid_thw
        return t * h * w // (self.merge_size**2)

    @property
    def tokens_per_frame(self) -> int:
        """Embeddings per temporal patch (the whole item for an image)."""
        _, h, w = self.grid_thw
        return h * w // (self.merge_size**2)


def smart_resize(
    num_frames: int,
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 112 * 112,
    max_pixels: int = 28 * 28 * 15000,
    temporal_factor: int = 2,
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor`` with num_frames*h*w inside the budget."""
    if height <= 0 or width <= 0:
        raise ImageSizeError(f"image has zero area ({width}x{height})")
    if num_frames < temporal_factor:
        raise ValueError(f"num_frames {num_frames} < temporal factor {temporal_factor}")
    if height < factor or width < factor:
        # tiny sides are first scaled up (and truncated) so the shorter one reaches `factor`
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_ASPECT_RATIO:
        raise ImageSizeError(f"aspect ratio {aspect:.1f} is above the limit of {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any PIL mode; transparent pixels are composited onto white."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_uint8(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize of uint8 frames [F, C, H, W] (what torchvision does on CPU)."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    return F.interpolate(
        frames, size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )


def normalize(frames: torch.Tensor, limits: ImageLimits) -> torch.Tensor:
    """uint8 [F, C, H, W] -> float32, rescale and mean/std folded into one step as the reference."""
    scale = 1.0 / limits.rescale_factor
    mean = (torch.tensor(limits.image_mean, device=frames.device) * scale).view(-1, 1, 1)
    std = (torch.tensor(limits.image_std, device=frames.device) * scale).view(-1, 1, 1)
    return frames.to(torch.float32).sub_(mean).div_(std)


def patchify(frames: torch.Tensor, limits: ImageLimits) -> tuple[torch.Tensor, int, int, int]:
    """Float frames [F, C, H, W] (F a multiple of T) -> ([F/T*gh*gw, C*T*P*P], grid_t, gh, gw).

    Patch order is (grid_t, gh/m, gw/m, m, m); each patch holds (C, T, P, P) values.
    """
    n, c, h, w = frames.shape
    p, m, tp = limits.patch_size, limits.merge_size, limits.temporal_patch_size
    gt, gh, gw = n // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # gt, bh, bw, mh, mw, C, T, P, P
    return x.reshape(gt * gh * gw, c * tp * p * p), gt, gh, gw


def patch_layout(frames: torch.Tensor, limits: ImageLimits) -> tuple[torch.Tensor, int, int, int]:
    """uint8 frames [F, C, H, W] (F a multiple of T; contiguous rows are fastest) -> (uint8
    patches [F/T*gh*gw, C*T*P*P], grid_t, gh, gw) in ``patchify``'s order, not yet normalised."""
    n, c, h, w = frames.shape
    p, m, tp = limits.patch_size, limits.merge_size, limits.temporal_patch_size
    gt, gh, gw = n // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, c * tp * p * p)  # one copy
    return x, gt, gh, gw


def normalize_patches(patches: torch.Tensor, limits: ImageLimits) -> torch.Tensor:
    """uint8 patches [N, C*T*P*P] (``patch_layout``, on any device) -> float32, normalised with
    the same arithmetic per value as ``normalize``."""
    scale = 1.0 / limits.rescale_factor
    mean = (torch.tensor(limits.image_mean, device=patches.device) * scale).view(1, -1, 1)
    std = (torch.tensor(limits.image_std, device=patches.device) * scale).view(1, -1, 1)
    n, c = patches.shape[0], len(limits.image_mean)
    values = patches.view(n, c, -1).to(torch.float32).sub_(mean).div_(std)
    return values.view(n, -1)


def preprocess_image(img: Image.Image, limits: ImageLimits) -> VisionInput:
    return preprocess_rgb(np.array(to_rgb(img)), limits)


def preprocess_rgb(rgb: np.ndarray, limits: ImageLimits, normalized: bool = True) -> VisionInput:
    """``preprocess_image`` of an image already decoded to a [H, W, 3] uint8 RGB array;
    ``normalized=False`` leaves ``pixel_values`` uint8 for ``normalize_patches`` (on the
    vision tower's device: a quarter of the bytes to copy there)."""
    frame = torch.from_numpy(rgb).unsqueeze(0).permute(0, 3, 1, 2)  # [1, 3, H, W] channels-last
    height, width = rgb.shape[:2]
    tp = limits.temporal_patch_size
    rh, rw = smart_resize(
        tp, height, width, limits.factor, limits.min_pixels, limits.max_pixels, tp
    )
    # a still image fills every temporal slot of its patch with the same frame
    resized = resize_uint8(frame, rh, rw).contiguous()  # W innermost: the patch rows' order
    patches, gt, gh, gw = patch_layout(resized.expand(tp, -1, -1, -1), limits)
    if normalized:
        patches = normalize_patches(patches, limits)
    return VisionInput(
        pixel_values=patches,
        grid_thw=(gt, gh, gw),
        modality="image",
        merge_size=limits.merge_size,
    )
