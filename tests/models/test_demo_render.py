"""The demo trainer's batched scene renderer against the Pillow + processor pipeline.

The same objects on the same backgrounds, drawn by ``render.py`` (tensors) and by ``scenes.py``
(Pillow) then preprocessed by the model's processor, must give nearly the same pixel values,
the same per-token labels almost everywhere and exactly the same picture-level targets; the
training-only pooling of ``heads.py`` must equal the per-item loop it replaces.
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from PIL import Image

from models.glm4v.demo import render, scenes
from models.glm4v.demo.data import aux_targets, token_labels
from models.glm4v.demo.heads import _pool
from models.glm4v.processing.processor import MultimodalProcessor


@pytest.fixture(scope="module")
def processor(tiny_ckpt_45):
    return MultimodalProcessor.from_pretrained(tiny_ckpt_45)


@pytest.mark.parametrize("canvas", [(203, 151), (64, 120), (512, 300)])
def test_rendered_batch_matches_pillow_and_the_processor(processor, canvas):
    w, h = canvas
    rng = random.Random(w * h)
    objects, backgrounds, pictures = [], [], []
    for count in (1, 1, 1, 2, 3, 4):
        placed = [replace(p, rot=rng.uniform(-0.3, 0.3)) for p in scenes._place(rng, w, h, count)]
        base = scenes.background_color(rng, [p.color for p in placed])
        img = Image.new("RGB", (w, h), base)
        for p in placed:
            scenes.draw_shape(img, p)
        objects.append(placed)
        backgrounds.append(render.Background(base))
        pictures.append(img)
    out = render.render((w, h), objects, backgrounds, processor.config.image, torch.device("cpu"))

    ref = [processor.preprocess_image(img) for img in pictures]
    assert out["image_grid_thw"].tolist() == [list(r.grid_thw) for r in ref]
    diff = (out["pixel_values"] - torch.cat([r.pixel_values for r in ref])).abs()
    assert diff.mean() < 0.02  # normalised units; only edge pixels differ, by rasterisation
    assert (diff > 0.1).float().mean() < 0.05

    examples = [
        scenes.Example("q", "a", "describe", image=img, objects=objs, size=(w, h))
        for img, objs in zip(pictures, objects, strict=True)
    ]
    labels = torch.cat(
        [token_labels(ex, list(r.grid_thw)) for ex, r in zip(examples, ref, strict=True)]
    )
    agree = (labels == out["token_labels"]).all(-1).float().mean()
    assert agree > 0.95
    assert (out["token_labels"][:, 0] > 0).any()  # shapes were labelled at all
    assert torch.equal(torch.stack([aux_targets(ex) for ex in examples]), out["aux"])


def test_random_batches_follow_the_scene_rules(processor):
    batch = render.random_batch(random.Random(3), 16, processor.config.image, torch.device("cpu"))
    aux = batch["aux"]
    assert batch["image_grid_thw"].shape == (16, 3)
    assert set(aux[:, 2].long().tolist()) <= {0, 1, 2, 3}
    single = aux[:, 2] == 0
    assert ((aux[single, 0] >= 0) & (aux[single, 0] < len(scenes.SHAPES))).all()
    assert (aux[~single, 0] == -100).all()
    # the picture drawn is not the background alone
    assert (batch["token_labels"][:, 0] > 0).float().mean() > 0.02


def test_pooling_equals_the_per_item_loop():
    grid = torch.tensor([[1, 4, 6], [3, 4, 4], [1, 2, 2], [2, 2, 4]])
    sizes = (grid.prod(-1) // 4).tolist()
    feats = torch.randn(sum(sizes), 5)
    pooled, motion = _pool(feats, grid)
    for i, (item, t) in enumerate(zip(feats.split(sizes), grid[:, 0].tolist(), strict=True)):
        groups = item.view(t, -1, 5).mean(1)
        assert torch.allclose(pooled[i], item.mean(0), atol=1e-6)
        assert torch.allclose(motion[i], torch.cat([groups[0], groups[-1]]), atol=1e-6)
