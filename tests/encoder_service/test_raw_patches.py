"""The encoder's uint8 hand-off: ``MediaPreparer(raw_patches=True)`` keeps patches uint8 and the
tower normalises them on its device; the embeddings must equal those of normalised float input
exactly, and the preparer must fall back when image and video constants differ."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from encoder_media import mp4_bytes
from PIL import Image

from encoder_service.config import MediaLimits, ModelLoad
from encoder_service.items import MediaItem, Modality
from encoder_service.media.decode import MediaPreparer
from encoder_service.tower import load_tower
from models.glm4v.processing.image import normalize_patches
from models.glm4v.processing.processor_config import ProcessorConfig


def _photo() -> bytes:
    rgb = np.random.default_rng(0).integers(0, 256, (150, 230, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("modality", [Modality.IMAGE, Modality.VIDEO])
def test_raw_patches_normalise_to_the_processor_values(modality: Modality):
    data = _photo() if modality is Modality.IMAGE else mp4_bytes(frames=9)
    item = MediaItem(0, modality, data=data)
    args = (ProcessorConfig(), MediaLimits(), b"s" * 32)
    raw = MediaPreparer(*args, raw_patches=True).prepare(item, data)
    want = MediaPreparer(*args).prepare(item, data)
    assert raw.vision.pixel_values.dtype == torch.uint8
    assert want.vision.pixel_values.dtype == torch.float32
    assert raw.content_hash == want.content_hash and raw.vision.grid_thw == want.vision.grid_thw
    got = normalize_patches(raw.vision.pixel_values, ProcessorConfig().image)
    assert torch.equal(got, want.vision.pixel_values)


def test_differing_video_constants_keep_normalised_patches():
    pc = ProcessorConfig()
    pc = dataclasses.replace(pc, video=dataclasses.replace(pc.video, image_std=(0.5, 0.5, 0.5)))
    preparer = MediaPreparer(pc, MediaLimits(), b"s" * 32, raw_patches=True)
    assert not preparer.raw_patches
    data = _photo()
    prepared = preparer.prepare(MediaItem(0, Modality.IMAGE, data=data), data)
    assert prepared.vision.pixel_values.dtype == torch.float32


def test_tower_embeds_uint8_patches_like_their_float_values(tiny_ckpt_45):
    tower = load_tower(ModelLoad(str(tiny_ckpt_45), device="cpu", dtype="float32"))
    data = _photo()
    item = MediaItem(0, Modality.IMAGE, data=data)
    args = (tower.processor, MediaLimits(), b"s" * 32)
    raw = MediaPreparer(*args, raw_patches=True).prepare(item, data).vision
    ref = MediaPreparer(*args).prepare(item, data).vision
    grid = torch.tensor([raw.grid_thw])
    with torch.inference_mode():
        got = tower.encode(raw.pixel_values, grid)
        want = tower.encode(ref.pixel_values, grid)
    assert got.shape == (raw.num_tokens, tower.model_config.vision.out_hidden_size)
    assert torch.equal(got, want)
