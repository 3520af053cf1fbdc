"""Demo scenes drawn as whole batches on the GPU, straight into the vision tower's inputs.

Contract: ``random_batch(rng, n, limits, device)`` draws ``n`` still scenes of one random canvas
size with the same rules as ``scenes.py`` (canvas, placement, rotation, colours, plain or noisy
background) and ``render(canvas, objects, backgrounds, limits, device)`` rasterises given ones
where the tensors live: point-in-shape tests at the canvas' pixel positions (as Pillow fills),
the processor's antialiased bicubic resize to multiples of 28, rescale and normalise, and the
processor's patch layout. Both return what ``heads.py`` trains on (``pixel_values``,
``image_grid_thw``, ``aux``, ``token_labels``), labelled exactly as ``data.py`` labels them.
The vision stage trains on these: the CPU pipeline (Pillow + processor per picture) feeds a
few thousand pictures a second, this some hundred thousand. Videos stay on the CPU pipeline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from models.glm4v.demo import scenes
from models.glm4v.processing.image import normalize, patchify, smart_resize
from models.glm4v.processing.processor_config import ImageLimits

MAX_OBJECTS = 4
MAX_VERTICES = 12  # the cross
_COLOR_NAMES = list(scenes.COLORS)


@dataclass(frozen=True)
class Background:
    color: tuple[int, int, int]
    noise_std: float = 0.0  # 0: plain
    noise_alpha: float = 0.0


def random_batch(
    rng: random.Random, n: int, limits: ImageLimits, device: torch.device
) -> dict[str, torch.Tensor]:
    w, h = scenes._canvas_size(rng)
    objects, backgrounds = [], []
    for _ in range(n):
        count = 1 if rng.random() < 0.6 else rng.choice((2, 3, 4))
        placed = scenes._place(rng, w, h, count)
        base = scenes.background_color(rng, [p.color for p in placed])
        noisy = rng.random() < 0.5
        bg = Background(base)
        if noisy:
            bg = Background(base, rng.uniform(10, 40), rng.uniform(0.1, 0.3))
        backgrounds.append(bg)
        objects.append([replace(p, rot=rng.uniform(-0.3, 0.3)) for p in placed])
    return render((w, h), objects, backgrounds, limits, device)


def _inside(
    xs: torch.Tensor,  # [P] or broadcastable x of the points
    ys: torch.Tensor,
    circle: torch.Tensor,  # [B, K] bool
    centre: torch.Tensor,  # [B, K, 3] (cx, cy, r)
    verts: torch.Tensor,  # [B, K, V, 2]
    present: torch.Tensor,  # [B, K] bool
) -> torch.Tensor:  # [B, K, *points] bool
    shape = (*circle.shape, *([1] * xs.dim()))
    cx, cy, r = (centre[..., i].view(shape) for i in range(3))
    in_circle = (xs - cx) ** 2 + (ys - cy) ** 2 <= r**2
    # even-odd rule over the polygon's edges (padding edges have zero height: never cross)
    odd = torch.zeros_like(in_circle)
    nxt = torch.roll(verts, -1, dims=2)
    for e in range(verts.shape[2]):
        x1, y1 = verts[:, :, e, 0].view(shape), verts[:, :, e, 1].view(shape)
        x2, y2 = nxt[:, :, e, 0].view(shape), nxt[:, :, e, 1].view(shape)
        spans = (y1 > ys) != (y2 > ys)
        dy = torch.where(y2 == y1, torch.ones_like(y1), y2 - y1)
        odd ^= spans & (xs < (x2 - x1) * (ys - y1) / dy + x1)
    inside = torch.where(circle.view(shape), in_circle, odd)
    return inside & present.view(shape)


def render(
    canvas: tuple[int, int],
    objects: list[list[scenes.Placed]],
    backgrounds: list[Background],
    limits: ImageLimits,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    w, h = canvas
    b, k = len(objects), MAX_OBJECTS
    # plain lists first, one tensor each at the end: thousands of tiny tensors cost more
    circle, present = [[False] * k for _ in range(b)], [[False] * k for _ in range(b)]
    centre = [[[0.0, 0.0, 0.0]] * k for _ in range(b)]
    verts = [[[[0.0, 0.0]] * MAX_VERTICES] * k for _ in range(b)]
    color = [[[0.0, 0.0, 0.0]] * k for _ in range(b)]
    codes = [[[0, 0]] * k for _ in range(b)]  # (shape, colour) + 1, 0 = none
    aux = []
    for i, objs in enumerate(objects):
        for j, p in enumerate(objs):
            present[i][j], circle[i][j] = True, p.shape == "circle"
            centre[i][j] = [p.cx, p.cy, p.r]
            if p.shape != "circle":
                pts = [list(v) for v in scenes._polygon(p.shape, p.cx, p.cy, p.r, p.rot)]
                verts[i][j] = pts + [pts[0]] * (MAX_VERTICES - len(pts))
            color[i][j] = list(scenes.COLORS[p.color])
            codes[i][j] = [scenes.SHAPES.index(p.shape) + 1, _COLOR_NAMES.index(p.color) + 1]
        single, first = len(objs) == 1, objs[0]
        aux.append(
            [
                scenes.SHAPES.index(first.shape) if single else -100,
                _COLOR_NAMES.index(first.color) if single else -100,
                len(objs) - 1,
                -100,
                *([first.cx / w, first.cy / h] if single else [-1.0, -1.0]),
            ]
        )
    circle = torch.tensor(circle, device=device)
    present = torch.tensor(present, device=device)
    centre = torch.tensor(centre, dtype=torch.float32, device=device)
    verts = torch.tensor(verts, dtype=torch.float32, device=device)
    color = torch.tensor(color, dtype=torch.float32, device=device)
    codes = torch.tensor(codes, dtype=torch.long, device=device)
    aux = torch.tensor(aux, dtype=torch.float32, device=device)

    # the background, then every shape over it, at the canvas' own pixels (as Pillow draws)
    img = torch.tensor([bg.color for bg in backgrounds], dtype=torch.float32, device=device)
    img = img[:, :, None, None].expand(b, 3, h, w).clone()
    noisy = [i for i, bg in enumerate(backgrounds) if bg.noise_std]
    if noisy:  # grey Gaussian noise blended in (the noise itself is not seeded per picture)
        std = torch.tensor([backgrounds[i].noise_std for i in noisy], device=device)
        alpha = torch.tensor([backgrounds[i].noise_alpha for i in noisy], device=device)
        grey = torch.randn(len(noisy), 1, h, w, device=device) * std.view(-1, 1, 1, 1) + 128
        grey = grey.clamp(0, 255).floor()
        alpha = alpha.view(-1, 1, 1, 1)
        img[noisy] = (img[noisy] * (1 - alpha) + grey * alpha).round()
    ys = torch.arange(h, device=device, dtype=torch.float32).view(h, 1)
    xs = torch.arange(w, device=device, dtype=torch.float32).view(1, w)
    inside = _inside(xs, ys, circle, centre, verts, present)  # [B, K, h, w]
    for j in range(k):
        img = torch.where(inside[:, j, None], color[:, j, :, None, None], img)

    # the processor: resize, rescale + normalise, patches (T = 2 copies of the frame)
    tp, factor = limits.temporal_patch_size, limits.factor
    rh, rw = smart_resize(tp, h, w, factor, limits.min_pixels, limits.max_pixels, tp)
    if (rh, rw) != (h, w):
        img = torch.nn.functional.interpolate(
            img, size=(rh, rw), mode="bicubic", align_corners=False, antialias=True
        )
        img = img.round().clamp(0, 255)
    frames = normalize(img, limits).unsqueeze(1).expand(b, tp, 3, rh, rw)
    pixels, _, gh, gw = patchify(frames.reshape(b * tp, 3, rh, rw), limits)

    # per merged token: what lies under the canvas pixel a nearest-neighbour resize picks
    th, tw = gh // limits.merge_size, gw // limits.merge_size
    ty = ((torch.arange(th, device=device) + 0.5) * h / th).floor().view(th, 1)
    tx = ((torch.arange(tw, device=device) + 0.5) * w / tw).floor().view(1, tw)
    hit = _inside(tx, ty, circle, centre, verts, present)  # [B, K, th, tw]
    labels = torch.zeros(b, th, tw, 2, dtype=torch.long, device=device)
    for j in range(k):
        labels = torch.where(hit[:, j, :, :, None], codes[:, j, None, None, :], labels)
    grid = torch.tensor([[1, gh, gw]] * b, device=device)
    return {
        "pixel_values": pixels,
        "image_grid_thw": grid,
        "aux": aux,
        "token_labels": labels.view(b * th * tw, 2),
    }
