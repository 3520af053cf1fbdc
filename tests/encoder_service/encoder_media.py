"""Media drawn at test time for the encoder tests: Pillow images and PyAV videos."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(width: int, height: int, color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    img = Image.new("RGB", (width, height), color)
    # a gradient so resizing and patch order matter
    px = np.asarray(img).copy()
    px[:, :, 0] = (np.arange(width)[None, :] * 7 + color[0]) % 256
    px[:, :, 1] = (np.arange(height)[:, None] * 5 + color[1]) % 256
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format=fmt)
    return buf.getvalue()


def mp4_bytes(frames: int = 12, width: int = 64, height: int = 48, fps: int = 4) -> bytes:
    import av  # PyAV only where a test encodes a video

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            arr = np.zeros((height, width, 3), dtype=np.uint8)
            arr[:, :, 0] = (np.arange(width)[None, :] * 4 + i * 20) % 256
            arr[:, :, 2] = (np.arange(height)[:, None] * 5 + i * 9) % 256
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
