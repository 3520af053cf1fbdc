"""Test media for the end-to-end tests: images drawn with Pillow, videos encoded with PyAV.

Every helper is deterministic in its seed, so two calls give byte-identical files.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw


def draw_image(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = size
    img = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        x1, y1 = x0 + int(rng.integers(4, width // 2)), y0 + int(rng.integers(4, height // 2))
        d.rectangle([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def write_video(
    path: Path, frames: int = 8, fps: int = 4, size: tuple[int, int] = (64, 48)
) -> Path:
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            a = np.zeros((height, width, 3), np.uint8)
            a[..., 2] = (i * 30) % 255
            a[height // 3 : height // 2, (i * 5) % (width - 12) :][:, :12] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}
