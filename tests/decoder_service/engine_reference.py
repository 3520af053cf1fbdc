"""Reference prompts for engine tests, built by transformers, plus drawn images and videos.

Prompts are built with transformers' own processor and its model supplies the vision embeddings
and 3-D positions, so the engine is checked in isolation against ``generate`` of the same
checkpoint (processor and model parity are tested elsewhere).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from decoder_service.engine.request import MediaItem


def draw_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 4)), int(rng.integers(0, height - 4))
        x1, y1 = x0 + int(rng.integers(3, width)), y0 + int(rng.integers(3, height))
        d.rectangle([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


def write_video(path: Path, frames: int, fps: int, width: int = 64, height: int = 48) -> Path:
    import av  # PyAV only where a test encodes a video

    with av.open(str(path), "w") as c:
        stream = c.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            a = np.zeros((height, width, 3), np.uint8)
            a[..., 0] = (i * 20) % 255
            a[height // 4 : height // 2, (i * 4) % (width - 10) :][:, :10] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return path


@dataclass
class PromptSpec:
    """One engine request built by the reference processor."""

    prompt_ids: list[int]
    items: list[MediaItem]
    positions: torch.Tensor  # [3, P]
    rope_delta: int
    hf_inputs: dict[str, Any]  # what transformers' generate takes

    def fresh_items(self) -> list[MediaItem]:
        """Copies (engines move and own the embeddings they are given)."""
        return [MediaItem(i.content_hash, i.spans, i.modality, i.embeds) for i in self.items]


class Reference:
    def __init__(self, ckpt: Path) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(ckpt)
        self.model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
        cfg = self.model.config
        self.video_start, self.video_end = cfg.video_start_token_id, cfg.video_end_token_id

    def build(self, parts: list[tuple[str, Any]]) -> PromptSpec:
        """``parts``: ("text", str) | ("image", PIL image) | ("video", path), in order."""
        from transformers.video_utils import load_video

        content, images, videos, metas, keys = [], [], [], [], []
        for kind, value in parts:
            if kind == "text":
                content.append({"type": "text", "text": value})
                continue
            content.append({"type": kind})
            if kind == "image":
                images.append(value)
                keys.append(("image", hashlib.sha256(value.tobytes()).hexdigest()))
            else:
                frames, meta = load_video(str(value), backend="pyav")
                videos.append(frames)
                metas.append(meta)
                keys.append(("video", hashlib.sha256(Path(value).read_bytes()).hexdigest()))
        messages = [{"role": "user", "content": content}]
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs |= {"videos": videos, "video_metadata": metas}
        enc = dict(self.processor(**kwargs))
        enc.pop("attention_mask", None)
        ids = enc["input_ids"][0].tolist()
        with torch.no_grad():
            pos, delta = self.model.model.get_rope_index(
                enc["input_ids"],
                enc["mm_token_type_ids"],
                image_grid_thw=enc.get("image_grid_thw"),
                video_grid_thw=enc.get("video_grid_thw"),
            )
            img_feats = vid_feats = []
            if images:
                out = self.model.model.get_image_features(
                    enc["pixel_values"], enc["image_grid_thw"]
                )
                img_feats = list(out.pooler_output)
            if videos:
                out = self.model.model.get_video_features(
                    enc["pixel_values_videos"], enc["video_grid_thw"]
                )
                vid_feats = list(out.pooler_output)
        items = self._items(ids, enc["mm_token_type_ids"][0].tolist(), keys, img_feats, vid_feats)
        return PromptSpec(ids, items, pos[:, 0], int(delta.reshape(-1)[0]), enc)

    def _items(self, ids, types, keys, img_feats, vid_feats) -> list[MediaItem]:
        runs: list[tuple[int, int, int]] = []  # (token type, start, end) of placeholder runs
        for i, t in enumerate(types):
            if t and runs and runs[-1][0] == t and runs[-1][2] == i:
                runs[-1] = (t, runs[-1][1], i + 1)
            elif t:
                runs.append((t, i, i + 1))
        img_keys = [h for kind, h in keys if kind == "image"]
        vid_keys = [h for kind, h in keys if kind == "video"]
        image_runs = [(s, e) for t, s, e in runs if t == 1]
        items = [
            MediaItem.contiguous(h, s, e - s, feats)
            for (s, e), h, feats in zip(image_runs, img_keys, img_feats, strict=True)
        ]
        starts = [i for i, tok in enumerate(ids) if tok == self.video_start]
        ends = [i for i, tok in enumerate(ids) if tok == self.video_end]
        for (a, b), h, feats in zip(
            zip(starts, ends, strict=True), vid_keys, vid_feats, strict=True
        ):
            spans = tuple((s, e) for t, s, e in runs if t == 2 and a < s < b)
            items.append(MediaItem(h, spans, "video", feats))
        return sorted(items, key=lambda it: it.offset)

    def generate(self, spec: PromptSpec, max_new_tokens: int) -> list[int]:
        with torch.no_grad():
            out = self.model.generate(
                **spec.hf_inputs, max_new_tokens=max_new_tokens, do_sample=False
            )
        return out[0, len(spec.prompt_ids) :].tolist()
