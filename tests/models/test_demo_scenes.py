"""The demo model's synthetic scenes: answers agree with the pixels, seeds repeat exactly, and the
per-token training labels sit under the right vision tokens."""

from __future__ import annotations

import random

import numpy as np
import pytest

from models.glm4v.demo import data, scenes


def _mask_of(img, color: str) -> np.ndarray:  # [H, W] bool: pixels in the shape's colour
    rgb = np.asarray(img.convert("RGB")).astype(int)
    return np.abs(rgb - np.array(scenes.COLORS[color])).sum(-1) < 30


def test_same_seed_same_example_and_different_seed_differs() -> None:
    a = scenes.make_example(random.Random(7))
    b = scenes.make_example(random.Random(7))
    c = scenes.make_example(random.Random(8))
    assert (a.question, a.answer, a.kind) == (b.question, b.answer, b.kind)
    pix = a.image.tobytes() if a.image else b"".join(f.tobytes() for f in a.frames)
    pix_b = b.image.tobytes() if b.image else b"".join(f.tobytes() for f in b.frames)
    assert pix == pix_b
    pix_c = c.image.tobytes() if c.image else b"".join(f.tobytes() for f in c.frames)
    assert pix != pix_c


@pytest.mark.parametrize("kind", ["shape", "color", "count", "describe"])
def test_image_answers_match_what_was_drawn(kind: str) -> None:
    rng = random.Random(100)
    for _ in range(20):
        ex = scenes.make_example(rng, kind)
        w, h = ex.image.size
        assert 64 <= w <= 512 and 64 <= h <= 512
        assert ex.answer == ex.answer.lower() and ex.answer.strip() == ex.answer
        for p in ex.objects:  # every shape shows up in its colour where it was placed
            assert _mask_of(ex.image, p.color)[int(p.cy), int(p.cx)]
        if kind == "shape":
            assert ex.answer in scenes.SHAPES and ex.answer == ex.objects[0].shape
        elif kind == "color":
            assert ex.answer in scenes.COLORS and ex.answer == ex.objects[0].color
        elif kind == "count":
            assert ex.answer == str(len(ex.objects)) and 1 <= len(ex.objects) <= 4
        else:
            left_to_right = sorted(ex.objects, key=lambda p: p.cx)
            expected = [f"a {p.color} {p.shape}" for p in left_to_right]
            at = 0  # the phrases appear in that order (the same phrase may repeat)
            for phrase in expected:
                at = ex.answer.index(phrase, at) + len(phrase)
            assert len(ex.answer.split(" and ")) == (2 if len(expected) > 1 else 1)


def test_video_shape_moves_in_the_answered_direction() -> None:
    rng = random.Random(5)
    for _ in range(12):
        ex = scenes.make_example(rng, "motion")
        assert 4 <= len(ex.frames) <= 16 and ex.answer in scenes.DIRECTIONS
        color = ex.objects[0].color
        centres = []
        for frame in (ex.frames[0], ex.frames[-1]):
            ys, xs = np.nonzero(_mask_of(frame, color))
            centres.append((xs.mean(), ys.mean()))
        (x0, y0), (x1, y1) = centres
        dx, dy = x1 - x0, y1 - y0
        moved = (
            ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        )
        assert moved == ex.answer


def test_token_labels_sit_under_the_shape() -> None:
    rng = random.Random(11)
    for _ in range(10):
        ex = scenes.make_example(rng, "shape")
        p = ex.objects[0]
        w, h = ex.size
        gh, gw = 2 * rng.randint(3, 16), 2 * rng.randint(3, 16)  # a patch grid, as the processor
        labels = data.token_labels(ex, [1, gh, gw])
        rows, cols = gh // 2, gw // 2
        assert labels.shape == (rows * cols, 2)
        # a token is foreground exactly when its cell's centre pixel shows the shape
        mask = _mask_of(ex.image, p.color)
        ys = ((np.arange(rows) + 0.5) * h / rows).astype(int)
        xs = ((np.arange(cols) + 0.5) * w / cols).astype(int)
        on_shape = mask[ys[:, None], xs[None, :]].reshape(-1)
        fg = (labels[:, 0] > 0).numpy()
        assert (fg != on_shape).sum() <= 1  # a sample point exactly on an edge may round apart
        assert set(labels[labels[:, 0] > 0, 0].tolist()) <= {1 + scenes.SHAPES.index(p.shape)}
        assert set(labels[labels[:, 1] > 0, 1].tolist()) <= {1 + list(scenes.COLORS).index(p.color)}
        if p.r > 0.75 * max(w / cols, h / rows):  # a shape wider than a cell is always seen
            assert fg.any()


def test_video_tokens_carry_no_dense_labels() -> None:
    ex = scenes.make_example(random.Random(3), "motion")
    labels = data.token_labels(ex, [4, 8, 8])
    assert labels.shape == (4 * 4 * 4, 2) and (labels == -100).all()
