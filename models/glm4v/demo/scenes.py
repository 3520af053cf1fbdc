"""Synthetic scenes and their questions/answers for the embedded demo model.

Contract: ``make_example(rng)`` draws one training or evaluation example: an image (or a short
video of one moving shape) drawn with Pillow, a question, and the short lower-case answer. The
same ``random.Random`` seed always gives the same example, so a held-out set is just a seed the
training never used. Nothing here knows about tokenizers or models.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 170),
    "orange": (250, 140, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
DIRECTIONS = ("left", "right", "up", "down")

Q_SHAPE = "What shape is in the image?"
Q_COLOR = "What color is the shape?"
Q_DESCRIBE = "Describe the image."
Q_COUNT = "How many shapes are there?"
Q_MOTION = "Which direction does the shape move?"


@dataclass
class Example:
    question: str
    answer: str
    kind: str  # "shape" | "color" | "describe" | "count" | "motion"
    image: Image.Image | None = None
    frames: list[Image.Image] = field(default_factory=list)  # videos only
    fps: float = 4.0
    objects: list[Placed] = field(default_factory=list)  # what was drawn (first frame for videos)
    size: tuple[int, int] = (0, 0)  # canvas (width, height)


@dataclass(frozen=True)
class Placed:
    shape: str
    color: str
    cx: float
    cy: float
    r: float
    rot: float = 0.0  # radians, polygons only


def background_color(rng: random.Random, avoid: list[str]) -> tuple[int, int, int]:
    """A mid-tone colour far from every colour in ``avoid``."""
    while True:
        base = tuple(rng.randint(60, 200) for _ in range(3))
        if all(sum(abs(a - b) for a, b in zip(base, COLORS[c], strict=True)) > 150 for c in avoid):
            return base


def _background(rng: random.Random, w: int, h: int, avoid: list[str]) -> Image.Image:
    """A plain or noisy background that never matches a shape's colour."""
    img = Image.new("RGB", (w, h), background_color(rng, avoid))
    if rng.random() < 0.5:
        # drawn from ``rng`` (not Pillow's own generator) so a seed repeats the exact pixels
        gen = np.random.default_rng(rng.getrandbits(32))
        grey = np.clip(128 + gen.normal(0, rng.uniform(10, 40), (h, w)), 0, 255)
        noise = Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
        img = Image.blend(img, noise, rng.uniform(0.1, 0.3))
    return img


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        return [(cx + r * 0.8 * x, cy + r * 0.8 * y) for x, y in pts]
    if shape == "triangle":
        angles = [rot + k * 2 * math.pi / 3 - math.pi / 2 for k in range(3)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.42
            a = rot + k * math.pi / 5 - math.pi / 2
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        t = 0.33
        pts = [
            (-t, -1),
            (t, -1),
            (t, -t),
            (1, -t),
            (1, t),
            (t, t),
            (t, 1),
            (-t, 1),
            (-t, t),
            (-1, t),
            (-1, -t),
            (-t, -t),
        ]
        return [(cx + r * x, cy + r * y) for x, y in pts]
    raise ValueError(f"unknown shape {shape}")


def draw_shape(img: Image.Image, p: Placed, fill: tuple[int, int, int] | int | None = None) -> None:
    """Draw ``p`` in its colour, or in ``fill`` (label masks)."""
    draw = ImageDraw.Draw(img)
    fill = COLORS[p.color] if fill is None else fill
    if p.shape == "circle":
        draw.ellipse([p.cx - p.r, p.cy - p.r, p.cx + p.r, p.cy + p.r], fill=fill)
    else:
        draw.polygon(_polygon(p.shape, p.cx, p.cy, p.r, p.rot), fill=fill)


def _canvas_size(rng: random.Random) -> tuple[int, int]:
    w = rng.randint(64, 512)
    aspect = rng.uniform(0.5, 2.0)
    h = int(min(512, max(64, w / aspect)))
    return w, h


def _place(rng: random.Random, w: int, h: int, n: int) -> list[Placed]:
    """n shapes that do not overlap; a lone shape's radius is at least 1/6 of the short side,
    one of several at least 1/8."""
    short = min(w, h)
    placed: list[Placed] = []
    tries = 0
    while len(placed) < n:
        tries += 1
        r_max = short / (3.2 if n == 1 else 2.2 + n)
        r_min = short / (6 if n == 1 else 8)
        r = rng.uniform(max(8.0, r_min), max(9.0, r_max))
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        if all(math.hypot(cx - q.cx, cy - q.cy) > r + q.r + 4 for q in placed):
            placed.append(Placed(rng.choice(SHAPES), rng.choice(list(COLORS)), cx, cy, r))
        elif tries > 200:  # start over on a crowded canvas
            placed, tries = [], 0
    return placed


def describe(placed: list[Placed]) -> str:
    items = [f"a {p.color} {p.shape}" for p in sorted(placed, key=lambda p: p.cx)]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def make_image_example(rng: random.Random, kind: str) -> Example:
    w, h = _canvas_size(rng)
    n = 1 if kind in ("shape", "color") else rng.choice((1, 1, 2, 3, 4))
    placed = _place(rng, w, h, n)
    img = _background(rng, w, h, [p.color for p in placed])
    placed = [replace(p, rot=rng.uniform(-0.3, 0.3)) for p in placed]
    for p in placed:
        draw_shape(img, p)
    extra = {"image": img, "objects": placed, "size": (w, h)}
    if kind == "shape":
        return Example(Q_SHAPE, placed[0].shape, kind, **extra)
    if kind == "color":
        return Example(Q_COLOR, placed[0].color, kind, **extra)
    if kind == "count":
        return Example(Q_COUNT, str(n), kind, **extra)
    return Example(Q_DESCRIBE, describe(placed), kind, **extra)


def make_video_example(rng: random.Random) -> Example:
    w, h = rng.randint(96, 256), rng.randint(96, 256)
    direction = rng.choice(DIRECTIONS)
    n_frames = rng.randint(4, 16)
    r = rng.uniform(min(w, h) / 10, min(w, h) / 6)
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    bg = _background(rng, w, h, [color])
    # travel along one axis across most of the frame; the other axis stays put
    span_x, span_y = w - 2 * r, h - 2 * r
    x0, y0 = rng.uniform(r, w - r), rng.uniform(r, h - r)
    frames, first = [], None
    for k in range(n_frames):
        f = k / (n_frames - 1)
        if direction in ("left", "right"):
            cx = r + span_x * (f if direction == "right" else 1 - f)
            cy = y0
        else:
            cx = x0
            cy = r + span_y * (f if direction == "down" else 1 - f)
        frame = bg.copy()
        placed = Placed(shape, color, cx, cy, r)
        first = first or placed
        draw_shape(frame, placed)
        frames.append(frame)
    # at least 2 s of video, so samplers at 2 frames/s still see the motion in 2+ frame pairs
    fps = rng.choice([f for f in (2, 4, 8) if n_frames / f >= 2])
    return Example(
        Q_MOTION, direction, "motion", frames=frames, fps=float(fps), objects=[first], size=(w, h)
    )


KINDS = ("shape", "color", "describe", "count", "motion")


def make_example(rng: random.Random, kind: str | None = None) -> Example:
    kind = kind or rng.choices(KINDS, weights=(3, 3, 2, 3, 2))[0]
    if kind == "motion":
        return make_video_example(rng)
    return make_image_example(rng, kind)
