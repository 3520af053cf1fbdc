"""Processor parity with transformers' GLM-4.5V / GLM-4.6V processors on the tiny checkpoints.

Compared exactly: resize targets, pixel values, grids, sampled frame indices, timestamps, rendered
chat text and expanded prompt token ids. Videos are encoded with PyAV at test time.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from models.glm4v.errors import ImageSizeError
from models.glm4v.processing import (
    POLICY_45V,
    POLICY_46V,
    MultimodalProcessor,
    PromptError,
    VideoMeta,
    VideoSampling,
    sample_frames,
    smart_resize,
)

av = pytest.importorskip("av")  # the video cases need PyAV; a machine without it skips


@pytest.fixture(scope="module", params=["45", "46"])
def pair(request):
    from transformers import AutoProcessor

    ckpt = request.getfixturevalue(f"tiny_ckpt_{request.param}")
    return AutoProcessor.from_pretrained(ckpt), MultimodalProcessor.from_pretrained(ckpt)


def encode_video(seconds: float, fps: float, w: int = 48, h: int = 36) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(int(round(seconds * fps))):
            arr = np.zeros((h, w, 3), np.uint8)
            arr[..., 0] = i * 7 % 256
            arr[:, : i % w, 1] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def hf_load_video(data: bytes, tmp_path):
    from transformers.video_utils import load_video

    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    return load_video(str(path), backend="pyav")


def test_smart_resize_matches_reference():
    from transformers.models.glm4v.image_processing_glm4v import smart_resize as ref

    sizes = [1, 10, 27, 29, 100, 333, 1080, 5000, 9000]
    budgets = [(6272, 100352), (112 * 112, 28 * 28 * 15000), (3136, 28 * 28 * 2 * 30000)]
    for t in (2, 3, 31):
        for h in sizes:
            for w in sizes:
                for lo, hi in budgets:
                    try:
                        expected = ref(t, h, w, factor=28, min_pixels=lo, max_pixels=hi)
                    except ValueError:
                        with pytest.raises(ImageSizeError):
                            smart_resize(t, h, w, 28, lo, hi)
                        continue
                    assert smart_resize(t, h, w, 28, lo, hi) == expected, (t, h, w, lo, hi)


IMAGE_CASES = [
    (10, 10, "RGB"),
    (3000, 4000, "RGB"),
    (28, 5000, "RGB"),
    (5000, 28, "L"),
    (123, 77, "RGBA"),
    (64, 80, "P"),
    (90, 60, "CMYK"),
]


@pytest.mark.parametrize(("h", "w", "mode"), IMAGE_CASES)
def test_image_pixels_match_reference(pair, h, w, mode):
    hf, ours = pair
    rng = np.random.default_rng(h * w)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    img = img if mode == "RGBA" else img.convert(mode)
    ref = hf.image_processor(images=[img], return_tensors="pt")
    got = ours.preprocess_image(img)
    assert [list(got.grid_thw)] == ref["image_grid_thw"].tolist()
    assert torch.equal(got.pixel_values, ref["pixel_values"])


def test_sample_frames_matches_reference_over_durations():
    from transformers import Glm4vVideoProcessor
    from transformers.models.glm46v.video_processing_glm46v import Glm46VVideoProcessor
    from transformers.video_utils import VideoMetadata

    refs = {POLICY_45V: Glm4vVideoProcessor(), POLICY_46V: Glm46VVideoProcessor()}
    for fps in (1.0, 2.0, 5.0, 12.0, 23.976, 30.0, 60.0):
        for seconds in (0.1, 0.5, 1, 3.4, 10, 29.9, 30, 31, 100, 299, 301, 650, 2500):
            total = max(1, int(seconds * fps))
            meta = VideoMeta(fps=fps, total_frames=total, duration=total / fps)
            for policy, ref in refs.items():
                hf_meta = VideoMetadata(total_num_frames=total, fps=fps, duration=total / fps)
                expected = [int(i) for i in ref.sample_frames(hf_meta)]
                if not expected:  # the reference returns nothing for clips under 1/6 s
                    continue
                got = sample_frames(meta, VideoSampling(policy=policy))
                assert got == expected, (policy, fps, seconds)


@pytest.mark.parametrize(("seconds", "fps"), [(1, 5), (4, 30), (40, 2)])
def test_video_matches_reference(pair, tmp_path, seconds, fps):
    from transformers.video_utils import VideoMetadata

    hf, ours = pair
    data = encode_video(seconds, fps)
    frames, meta = hf_load_video(data, tmp_path)
    hf_meta = VideoMetadata(
        total_num_frames=meta.total_num_frames, fps=meta.fps, duration=meta.duration
    )
    ref = hf.video_processor(
        videos=[frames], video_metadata=[hf_meta], return_metadata=True, return_tensors="pt"
    )
    got = ours.video_from_bytes(data)
    ref_meta = ref["video_metadata"][0]
    assert got.frame_indices == [int(i) for i in ref_meta.frames_indices]
    assert got.timestamps == pytest.approx(list(ref_meta.timestamps[::2]), abs=0)
    assert [list(got.grid_thw)] == ref["video_grid_thw"].tolist()
    assert torch.equal(got.pixel_values, ref["pixel_values_videos"])


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def _conversations():
    q = {"type": "text", "text": "What is in these?"}
    yield {"messages": [{"role": "user", "content": "Hello there"}]}, []
    yield {"messages": [{"role": "user", "content": [{"type": "image"}, q]}]}, ["image"]
    yield (
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "video"}, q]}],
         "enable_thinking": False},
        ["video"],
    )  # fmt: skip
    yield (
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, q]}]},
        [
            "image",
            "image",
        ],
    )
    call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    yield (
        {"messages": [{"role": "user", "content": [{"type": "image"}, q]},
                      {"role": "assistant", "content": "", "tool_calls": [{"function": call}]},
                      {"role": "tool", "content": "sunny"},
                      {"role": "user", "content": "and tomorrow?"}],
         "tools": TOOLS, "enable_thinking": False},
        ["image"],
    )  # fmt: skip
    yield (
        {"messages": [{"role": "user", "content": [{"type": "video"}, q]},
                      {"role": "assistant", "content": "Let me check.", "tool_calls": [{"function": call}],
                       "reasoning_content": "The user wants weather."},
                      {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "warm"}],
         "tools": TOOLS},
        ["video"],
    )  # fmt: skip
    shot = [{"type": "text", "text": "screenshot:"}, {"type": "image"}]
    yield (
        {"messages": [{"role": "user", "content": "Open the page."},
                      {"role": "assistant", "content": "", "tool_calls": [{"function": call}]},
                      {"role": "tool", "content": shot}],
         "tools": TOOLS},
        ["image"],
    )  # fmt: skip


def _openai_style(messages):
    """The same conversation as an OpenAI client sends it (URL parts, JSON-string arguments)."""
    out = json.loads(json.dumps(messages))
    for m in out:
        for part in m["content"] if isinstance(m["content"], list) else []:
            if part.get("type") in ("image", "video"):
                kind = part.pop("type")
                part.update({"type": f"{kind}_url", f"{kind}_url": {"url": "https://x/y"}})
        if "reasoning_content" in m:  # newer clients name it "reasoning"
            m["reasoning"] = m.pop("reasoning_content")
        for call in m.get("tool_calls", []):
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    return out


@pytest.mark.parametrize("case", range(7))
def test_expanded_prompt_matches_reference(pair, tmp_path, case):
    from transformers.video_utils import VideoMetadata

    hf, ours = pair
    kwargs, kinds = list(_conversations())[case]
    extra = {k: v for k, v in kwargs.items() if k != "messages"}
    hf_text = hf.apply_chat_template(
        kwargs["messages"], add_generation_prompt=True, tokenize=False, **extra
    )
    rendered = ours.render(
        _openai_style(kwargs["messages"]),
        tools=kwargs.get("tools"),
        enable_thinking=kwargs.get("enable_thinking"),
    )
    assert rendered.text == hf_text
    assert [m.modality for m in rendered.media] == kinds

    images = [Image.new("RGB", (100 + 40 * i, 90), (30 * i, 90, 200)) for i in range(len(kinds))]
    data = encode_video(3.4, 12)
    frames, meta = hf_load_video(data, tmp_path)
    hf_meta = VideoMetadata(
        total_num_frames=meta.total_num_frames, fps=meta.fps, duration=meta.duration
    )
    hf_kwargs = {}
    if "image" in kinds:
        hf_kwargs["images"] = [img for img, k in zip(images, kinds, strict=True) if k == "image"]
    if "video" in kinds:
        hf_kwargs.update(videos=[frames], video_metadata=[hf_meta])
    ref = hf(text=[hf_text], return_tensors="pt", **hf_kwargs)

    media = [
        ours.preprocess_image(img) if k == "image" else ours.video_from_bytes(data)
        for img, k in zip(images, kinds, strict=True)
    ]
    processed = ours.process(
        _openai_style(kwargs["messages"]),
        media,
        tools=kwargs.get("tools"),
        enable_thinking=kwargs.get("enable_thinking"),
    )
    ids = processed.tokens.token_ids
    assert ids == ref["input_ids"][0].tolist()
    image_id = ours.expander.ids.image
    covered = sorted(i for m in processed.tokens.media for s, e in m.spans for i in range(s, e))
    assert covered == [i for i, t in enumerate(ids) if t == image_id]


def test_processor_config_follows_checkpoint(tiny_ckpt_45, tiny_ckpt_46):
    from models.glm4v.processing import load_processor_config

    c45, c46 = load_processor_config(tiny_ckpt_45), load_processor_config(tiny_ckpt_46)
    assert (c45.sampling.policy, c45.timestamp_policy) == (POLICY_45V, POLICY_45V)
    assert (c46.sampling.policy, c46.timestamp_policy) == (POLICY_46V, POLICY_46V)
    size = json.loads((tiny_ckpt_45 / "preprocessor_config.json").read_text())["size"]
    assert (c45.image.min_pixels, c45.image.max_pixels) == (
        size["shortest_edge"],
        size["longest_edge"],
    )


def test_per_request_video_overrides(pair):
    _, ours = pair
    data = encode_video(4, 30)
    capped = ours.video_from_bytes(data, max_frames=4)
    assert len(capped.frame_indices) == 4 and capped.grid_thw[0] == 2
    assert capped.timestamps[0] < capped.timestamps[1]
    if ours.config.sampling.policy == POLICY_45V:
        slow = ours.video_from_bytes(data, fps=1)
        assert slow.frame_indices == [0, 30, 60, 90]


def test_placeholder_text_in_user_content_is_refused(pair):
    _, ours = pair
    with pytest.raises(PromptError, match="placeholder"):
        ours.render([{"role": "user", "content": "look: <|image|>"}])
    rendered = ours.render([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    with pytest.raises(PromptError):
        ours.expand(rendered.text, [])
