"""Untrusted media bytes -> RGB pixels, with limits checked before any expensive work.

Contract:
- ``decode_image(data, max_pixels)`` -> RGB ``PIL.Image``. Only PNG, JPEG, WEBP, GIF (first frame)
  and BMP are opened. The declared size is checked from the header before pixels are decoded, so
  a decompression bomb fails cheaply. EXIF orientation is applied; transparency is composited onto
  white and other modes (P, L, CMYK, ...) converted to RGB, as transformers' image processors do.
- ``decode_video(data, sampling, limits)`` -> ``DecodedVideo(frames, meta, frame_indices)`` using
  PyAV. Only MP4/MOV, Matroska/WebM and AVI containers are opened, recognised from their magic
  bytes, and the demuxer is forced to the recognised one (no format probing, so playlist-style
  demuxers that open further URLs or files are never reached). It reads the container metadata (fps, frame count, duration = frames / fps, as transformers'
  PyAV loader does), picks frames with ``video.sample_frames`` and decodes only up to the last
  frame it needs, converting only the picked frames to RGB.
Failures raise ``ImageDecodeError`` / ``ImageSizeError`` / ``VideoDecodeError`` with messages
written here; text from the decoders is never passed on.

Not here: fetching URLs or files (the encoder service), resizing and patches (``image.py``,
``video.py``).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.glm4v.errors import ImageDecodeError, ImageSizeError, VideoDecodeError
from models.glm4v.processing.image import to_rgb
from models.glm4v.processing.processor_config import VideoSampling
from models.glm4v.processing.video import VideoMeta, sample_frames

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024
VIDEO_CONTAINERS = "MP4/MOV, WebM/Matroska, AVI"

# What Pillow raises on malformed data while decoding (it has no single base class for this).
_PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)


def _av():
    """PyAV, imported when a video is first decoded: image-only callers never need it."""
    import av

    return av


def _av_errors() -> tuple[type[BaseException], ...]:
    return (_av().FFmpegError, OSError, ValueError, EOFError)


@dataclass(frozen=True)
class VideoLimits:
    max_duration_s: float = 3600.0  # longer videos are refused before decoding
    max_total_frames: int = 216_000  # 1 h at 60 fps
    max_frame_pixels: int = 4096 * 4096  # per decoded frame
    # fewer decodable frames than the container declares is tolerated down to this fraction
    # (containers often overstate the count by a frame or two); below it the video is truncated
    min_decoded_fraction: float = 0.9


class DecodedVideo(NamedTuple):
    frames: list[np.ndarray]  # F x [H, W, 3] uint8, one per frame index
    meta: VideoMeta
    frame_indices: list[int]  # source frame of each entry of `frames` (even count)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    if not data:
        raise ImageDecodeError("image data is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageSizeError("image declares more pixels than allowed") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"data is not a decodable image (allowed: {', '.join(IMAGE_FORMATS)})"
        ) from exc
    except _PIL_DECODE_ERRORS as exc:
        raise ImageDecodeError("image header is corrupt") from exc
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageSizeError(f"image has zero area ({width}x{height})")
    if width * height > max_pixels:
        raise ImageSizeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    try:
        img.load()
    except _PIL_DECODE_ERRORS as exc:
        raise ImageDecodeError(f"{img.format} image data is corrupt or truncated") from exc
    try:
        img = ImageOps.exif_transpose(img)
    except _PIL_DECODE_ERRORS + (KeyError, TypeError):
        pass  # a malformed orientation tag leaves the pixels as stored
    return to_rgb(img)


def decode_video(
    data: bytes,
    sampling: VideoSampling,
    limits: VideoLimits = VideoLimits(),
    temporal_patch_size: int = 2,
) -> DecodedVideo:
    if not data:
        raise VideoDecodeError("video data is empty")
    fmt = _container_format(data)
    if fmt is None:
        raise VideoDecodeError(f"unsupported video container (allowed: {VIDEO_CONTAINERS})")
    try:
        container = _av().open(io.BytesIO(data), mode="r", format=fmt)
    except _av_errors() as exc:
        raise VideoDecodeError("data is not a decodable video container") from exc
    with container:
        if not container.streams.video:
            raise VideoDecodeError("container has no video stream")
        stream = container.streams.video[0]
        meta = _read_meta(container, stream, limits)
        indices = sample_frames(meta, sampling, temporal_patch_size)
        frames = _decode_picked(container, stream, indices, meta, limits)
    return DecodedVideo(frames=frames, meta=meta, frame_indices=indices)


def _container_format(data: bytes) -> str | None:
    """The demuxer for ``data`` by magic bytes, or None when it is not an allowed container."""
    if data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return "mov"  # ISO base media: mp4, mov, m4v, 3gp
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"  # also WebM
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    return None


def _read_meta(container, stream, limits: VideoLimits) -> VideoMeta:
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    if fps <= 0:
        raise VideoDecodeError("video stream has no frame rate")
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > limits.max_frame_pixels:
        raise VideoDecodeError(
            f"video frames are {width}x{height}; the limit is {limits.max_frame_pixels} pixels"
        )
    total = int(stream.frames or 0)
    if total <= 0:
        total = _count_packets(container, stream, limits.max_total_frames)
    if total <= 0:
        raise VideoDecodeError("video stream has no frames")
    if total > limits.max_total_frames:
        raise VideoDecodeError(f"video has {total} frames; the limit is {limits.max_total_frames}")
    duration = total / fps
    if duration > limits.max_duration_s:
        raise VideoDecodeError(
            f"video is {duration:.1f} s long; the limit is {limits.max_duration_s:.0f} s"
        )
    return VideoMeta(fps=fps, total_frames=total, duration=duration)


def _count_packets(container, stream, cap: int) -> int:
    """Frame count of containers that do not declare one: demux (no decoding) and count."""
    count = 0
    try:
        for packet in container.demux(stream):
            if packet.size:
                count += 1
                if count > cap:
                    break
        container.seek(0)
    except _av_errors() as exc:
        raise VideoDecodeError("video data is corrupt or truncated") from exc
    return count


def _decode_picked(container, stream, indices: list[int], meta: VideoMeta, limits: VideoLimits):
    wanted = set(indices)
    last_needed = max(indices)
    picked: dict[int, np.ndarray] = {}
    last_frame, decoded = None, 0
    stream.thread_type = "AUTO"
    try:
        for i, frame in enumerate(container.decode(stream)):
            decoded, last_frame = i + 1, frame
            if i in wanted:
                picked[i] = frame.to_ndarray(format="rgb24")
            if i >= last_needed:
                break
    except _av_errors() as exc:
        raise VideoDecodeError("video data is corrupt or truncated") from exc
    if decoded == 0:
        raise VideoDecodeError("video has no decodable frames")
    if decoded <= last_needed:
        if decoded < limits.min_decoded_fraction * meta.total_frames:
            raise VideoDecodeError(
                f"video is truncated: {decoded} of {meta.total_frames} frames decodable"
            )
        # the container overstated its length slightly: later picks reuse the last real frame
        tail = last_frame.to_ndarray(format="rgb24")
        for i in wanted:
            if i >= decoded:
                picked[i] = tail
    return [picked[i] for i in indices]
