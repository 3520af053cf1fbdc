"""3-D rope positions vs transformers' ``get_rope_index`` and vs hand-worked examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.glm4v.processing import (
    MediaSpans,
    MultimodalProcessor,
    VisionInput,
    get_rope_index,
    positions_after,
)


@pytest.fixture(scope="module")
def setup(tiny_ckpt_45):
    from transformers import AutoConfig, AutoProcessor
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeModel

    torch.manual_seed(0)
    reference = Glm4vMoeModel(AutoConfig.from_pretrained(tiny_ckpt_45)).eval()
    return (
        reference,
        AutoProcessor.from_pretrained(tiny_ckpt_45),
        MultimodalProcessor.from_pretrained(tiny_ckpt_45),
    )


def _video(processor: MultimodalProcessor, n_frames: int, h: int, w: int) -> VisionInput:
    rng = np.random.default_rng(n_frames)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n_frames)]
    return processor.preprocess_video(frames, list(range(0, 3 * n_frames, 3)), fps=3.0)


def _image(processor: MultimodalProcessor, h: int, w: int) -> VisionInput:
    return processor.preprocess_image(Image.new("RGB", (w, h), (10, 200, 30)))


CASES = {
    "text": [],
    "image": [("image", (140, 90))],
    "two_images": [("image", (60, 200)), ("image", (300, 120))],
    "video": [("video", (6, 100, 60))],
    "image_and_video": [("image", (200, 150)), ("video", (4, 60, 120)), ("image", (56, 56))],
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(setup, case):
    reference, hf_processor, ours = setup
    media = [
        _image(ours, *shape) if kind == "image" else _video(ours, *shape)
        for kind, shape in CASES[case]
    ]
    content = [{"type": kind} for kind, _ in CASES[case]] + [{"type": "text", "text": "Describe."}]
    processed = ours.process([{"role": "user", "content": content}], media)
    ids = torch.tensor([processed.tokens.token_ids])
    type_ids = torch.tensor(hf_processor.create_mm_token_type_ids(ids.tolist()))
    image_grids = [m.grid_thw for m in media if m.modality == "image"]
    video_grids = [m.grid_thw for m in media if m.modality == "video"]
    ref_pos, ref_delta = reference.get_rope_index(
        ids,
        type_ids,
        image_grid_thw=torch.tensor(image_grids) if image_grids else None,
        video_grid_thw=torch.tensor(video_grids) if video_grids else None,
    )
    assert torch.equal(processed.rope.positions, ref_pos[:, 0])
    assert processed.rope.rope_delta == int(ref_delta)


def test_worked_example_from_the_spec():
    # 5 text tokens, an image of grid [1, 4, 6] (2 x 3 merged tokens), then 3 text tokens
    image = MediaSpans("image", (1, 4, 6), ((5, 11),))
    rope = get_rope_index(14, [image])
    assert rope.positions.tolist() == [
        [0, 1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 8, 9, 10],
        [0, 1, 2, 3, 4, 5, 5, 5, 6, 6, 6, 8, 9, 10],
        [0, 1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10],
    ]
    assert rope.rope_delta == 11 - 14


def test_image_then_video_frames_advance_per_segment():
    # T T | image 1x1 | T | frame 2x1 | T T | frame 2x1 | T
    image = MediaSpans("image", (1, 2, 2), ((2, 3),))
    video = MediaSpans("video", (2, 4, 2), ((4, 6), (8, 10)))
    rope = get_rope_index(11, [video, image])  # item order does not matter, spans do
    assert rope.positions.tolist() == [
        [0, 1, 2, 3, 4, 4, 6, 7, 8, 8, 10],
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
        [0, 1, 2, 3, 4, 4, 6, 7, 8, 8, 10],
    ]
    assert rope.rope_delta == 0


def test_later_tokens_continue_from_delta():
    image = MediaSpans("image", (1, 8, 8), ((3, 19),))
    rope = get_rope_index(22, [image])
    nxt = positions_after(22, 3, rope.rope_delta)
    assert nxt.shape == (3, 3)
    assert nxt[:, 0].tolist() == [int(rope.positions.max()) + 1] * 3
    assert nxt[0].tolist() == [22 + rope.rope_delta + i for i in range(3)]


def test_text_only_is_plain_positions():
    rope = get_rope_index(list(range(7)), [])
    assert torch.equal(rope.positions, torch.arange(7).expand(3, -1))
    assert rope.rope_delta == 0


def test_span_that_does_not_fit_its_grid_is_refused():
    with pytest.raises(ValueError):
        get_rope_index(10, [MediaSpans("image", (1, 4, 4), ((2, 5),))])
