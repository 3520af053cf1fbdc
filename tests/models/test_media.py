"""Media decoding: good inputs decode like transformers would see them, bad ones fail cleanly."""

from __future__ import annotations

import io
import re
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from models.glm4v.errors import ImageDecodeError, ImageSizeError, MediaError, VideoDecodeError
from models.glm4v.processing import (
    ImageLimits,
    VideoLimits,
    VideoSampling,
    decode_image,
    decode_video,
    preprocess_image,
)

av = pytest.importorskip("av")  # the video cases need PyAV; a machine without it skips


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(h: int, w: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but that carries no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _assert_clean(exc: MediaError) -> None:
    """The message is ours: no decoder object reprs, addresses or library error text."""
    text = str(exc)
    assert not re.search(r"0x[0-9a-fA-F]{6,}|object at|<|Errno|PIL|av\.|Traceback", text), text


def encode_video(frames: int, fps: int = 10, fmt: str = "mp4", codec: str = "mpeg4", path=None):
    target = path or io.BytesIO()
    with av.open(target, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(frames):
            arr = np.full((24, 32, 3), i * 9 % 256, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path.read_bytes() if path else target.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "WEBP", "JPEG", "GIF"])
def test_allowed_formats_decode_to_rgb(fmt):
    src = Image.fromarray(_noise(30, 50))
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    img = decode_image(_png(src, fmt, **kwargs))
    assert img.mode == "RGB" and img.size == (50, 30)
    if fmt in ("PNG", "BMP", "WEBP"):
        assert np.array_equal(np.asarray(img), np.asarray(src))


def test_transparency_is_composited_on_white_like_transformers():
    from transformers.image_transforms import convert_to_rgb

    src = Image.fromarray(_noise(20, 20, channels=4), "RGBA")
    got = np.asarray(decode_image(_png(src)))
    assert np.array_equal(got, convert_to_rgb(src, return_numpy=True))
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(decode_image(_png(clear))).min() == 255  # white, not black


def test_exif_orientation_is_applied():
    src = Image.fromarray(_noise(20, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img = decode_image(_png(src, "JPEG", exif=exif.tobytes()))
    assert img.size == (20, 40)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"definitely not an image",
        _png(Image.fromarray(_noise(64, 64)))[:300],
        _png(Image.fromarray(_noise(64, 64)), "JPEG")[:200],
        _png(Image.fromarray(_noise(8, 8)), "TIFF"),
    ],
    ids=["empty", "garbage", "truncated-png", "truncated-jpeg", "tiff"],
)
def test_bad_image_bytes_raise_decode_error(data):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    _assert_clean(info.value)


@pytest.mark.parametrize("side", [9000, 100_000])
def test_decompression_bomb_fails_before_decoding(side):
    start = time.monotonic()
    with pytest.raises(ImageSizeError) as info:
        decode_image(_png_header_only(side, side))
    assert time.monotonic() - start < 1.0
    _assert_clean(info.value)


def test_pixel_limit_is_the_callers():
    data = _png(Image.fromarray(_noise(100, 100)))
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageSizeError, match="10000 pixels"):
        decode_image(data, max_pixels=9_999)


def test_extreme_aspect_ratio_is_refused_at_preprocessing():
    img = decode_image(_png(Image.fromarray(_noise(1, 250))))
    with pytest.raises(ImageSizeError, match="aspect ratio") as info:
        preprocess_image(img, ImageLimits())
    _assert_clean(info.value)


def test_video_decodes_only_sampled_frames():
    got = decode_video(encode_video(25, fps=10), VideoSampling())
    assert got.meta.total_frames == 25 and got.meta.fps == 10.0
    # 2 per second over 2.5 s = 5 frames, the last repeated to make an even count
    assert got.frame_indices == [0, 5, 10, 15, 20, 20]
    assert len(got.frames) == 6 and got.frames[0].shape == (24, 32, 3)
    assert got.frames[1][0, 0, 0] != got.frames[0][0, 0, 0]


def test_webm_without_declared_frame_count_is_counted():
    got = decode_video(encode_video(12, fmt="webm", codec="libvpx"), VideoSampling())
    assert got.meta.total_frames == 12


def _audio_only() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
        )
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    return buf.getvalue()


def _webm_header_only() -> bytes:
    data = encode_video(10, fmt="webm", codec="libvpx")
    return data[: data.index(b"\x1f\x43\xb6\x75")]  # cut at the first Cluster: no frames


def _truncated_mp4(tmp_path) -> bytes:
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for i in range(60):
            arr = np.random.default_rng(i).integers(0, 256, (24, 32, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = path.read_bytes()
    return data[: len(data) // 3]  # index intact, most frame data gone


@pytest.mark.parametrize(
    "make",
    [
        lambda tmp: b"",
        lambda tmp: b"\x00\x01\x02 not a video" * 50,
        lambda tmp: encode_video(30)[:1000],
        lambda tmp: _png(Image.fromarray(_noise(16, 16))),
        lambda tmp: _audio_only(),
        lambda tmp: _webm_header_only(),
        _truncated_mp4,
    ],
    ids=["empty", "garbage", "cut-container", "an-image", "audio-only", "no-frames", "truncated"],
)
def test_bad_video_bytes_raise_decode_error(make, tmp_path):
    with pytest.raises(VideoDecodeError) as info:
        decode_video(make(tmp_path), VideoSampling())
    _assert_clean(info.value)


@pytest.mark.parametrize("fmt", ["avi", "matroska"])
def test_other_allowed_containers_decode(fmt):
    got = decode_video(encode_video(8, fmt=fmt), VideoSampling())
    assert len(got.frames) == len(got.frame_indices) >= 2


def test_playlists_and_other_demuxers_are_not_opened():
    playlist = (
        b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/hostname\n#EXT-X-ENDLIST\n"
    )
    with pytest.raises(VideoDecodeError, match="unsupported video container"):
        decode_video(playlist, VideoSampling())


def test_video_limits_are_checked_before_decoding():
    data = encode_video(30, fps=10)
    with pytest.raises(VideoDecodeError, match="limit is 2 s"):
        decode_video(data, VideoSampling(), VideoLimits(max_duration_s=2))
    with pytest.raises(VideoDecodeError, match="limit is 20"):
        decode_video(data, VideoSampling(), VideoLimits(max_total_frames=20))
    with pytest.raises(VideoDecodeError, match="32x24"):
        decode_video(data, VideoSampling(), VideoLimits(max_frame_pixels=500))
