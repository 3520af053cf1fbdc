"""Synthetic, seeded request sets for ``glimpse bench serve`` (nothing is downloaded).

Contract: ``build_requests(dataset, num, input_len, seed, image_variants)`` returns
``num`` ready-to-send ``BenchRequest``s (chat ``messages`` plus bookkeeping); the same arguments
always give the same requests, byte for byte. ``visionarena-synthetic`` pairs about ``input_len``
words of question text with one image whose size follows a mix of real chat uploads: camera
photos (JPEG, 4:3 / 3:2 / 16:9, landscape or portrait, 640x480 .. 4032x3024) and screenshots
(PNG, desktop 1280x720 .. 2560x1600 and phone 1170x2532 / 1080x2400). ``text-synthetic`` is the
question text alone. ``sample_image_specs`` draws the sizes without drawing any pixels.

Images are rendered small, resized to the target size and encoded once per (size, variant):
at most ``image_variants`` distinct images per size, so building 1000 requests takes seconds.
NOTE: a repeated image can hit the server's media cache; raise ``image_variants`` (or turn the
server's cache off) to measure uncached encoding.

Not here: sending requests, timing, reporting.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

PHOTO_SHARE = 0.6  # the rest are screenshots
PORTRAIT_SHARE = 0.35  # of the photos taken upright
# Landscape camera sizes: 4:3, 3:2 and 16:9.
PHOTO_SIZES: tuple[tuple[int, int], ...] = (
    (640, 480),
    (1024, 768),
    (1600, 1200),
    (2048, 1536),
    (4032, 3024),
    (1200, 800),
    (1800, 1200),
    (3000, 2000),
    (1280, 720),
    (1920, 1080),
    (3840, 2160),
)
SCREENSHOT_SIZES: tuple[tuple[int, int], ...] = (
    (1280, 720),
    (1366, 768),
    (1440, 900),
    (1920, 1080),
    (2560, 1440),
    (2560, 1600),
    (1170, 2532),  # phone
    (1080, 2400),  # phone
)
_RENDER_LONG_SIDE = 256  # photos are drawn this small, then resized up

_WORDS = (
    "the image shows what where which color shape large small left right top bottom center near "
    "far above below behind front red green blue yellow orange purple black white gray circle "
    "square triangle line text label button window screen photo picture scene object person car "
    "tree house road sky cloud water table chair book phone cup light dark bright many few two "
    "three count describe explain compare read find list name detail background foreground "
    "corner edge pattern stripe dot grid chart graph number value title menu icon page panel "
    "first second last next other same different inside outside between around over under "
    "and or with without from into about this that these those there here is are was were has "
    "have do does can could would should please tell me you it its they them"
).split()
_QUESTION_STARTS = ("What", "Where", "Which", "How", "Why", "Can you", "Please describe", "Is")


class ImageSpec(NamedTuple):
    kind: str  # "photo" (JPEG) or "screenshot" (PNG)
    width: int
    height: int
    variant: int  # which of the cached images of this size


@dataclass(frozen=True)
class BenchRequest:
    messages: list[dict]  # OpenAI chat messages, ready to send
    prompt_words: int  # words of question text: the input-token estimate without server usage
    image: ImageSpec | None


def sample_image_specs(num: int, seed: int, image_variants: int = 4) -> list[ImageSpec]:
    """Draw ``num`` image sizes from the upload mix (deterministic per seed)."""
    rng = np.random.default_rng([seed, 1])
    specs = []
    for _ in range(num):
        if rng.random() < PHOTO_SHARE:
            w, h = PHOTO_SIZES[rng.integers(len(PHOTO_SIZES))]
            if rng.random() < PORTRAIT_SHARE:
                w, h = h, w
            kind = "photo"
        else:
            w, h = SCREENSHOT_SIZES[rng.integers(len(SCREENSHOT_SIZES))]
            kind = "screenshot"
        specs.append(ImageSpec(kind, int(w), int(h), int(rng.integers(image_variants))))
    return specs


def build_requests(
    dataset: str, num: int, input_len: int, seed: int, image_variants: int = 4
) -> list[BenchRequest]:
    if dataset not in ("visionarena-synthetic", "text-synthetic"):
        raise ValueError(f"unknown dataset {dataset!r}")
    rng = np.random.default_rng([seed, 0])
    texts = [_question(rng, input_len) for _ in range(num)]
    if dataset == "text-synthetic":
        return [BenchRequest([{"role": "user", "content": t}], input_len, None) for t in texts]
    specs = sample_image_specs(num, seed, image_variants)
    cache: dict[ImageSpec, str] = {}
    out = []
    for text, spec in zip(texts, specs, strict=True):
        if spec not in cache:
            cache[spec] = render_image_url(spec, seed)
        content = [
            {"type": "image_url", "image_url": {"url": cache[spec]}},
            {"type": "text", "text": text},
        ]
        out.append(BenchRequest([{"role": "user", "content": content}], input_len, spec))
    return out


def render_image_url(spec: ImageSpec, seed: int) -> str:
    """One image as a ``data:`` URL: JPEG for photos, PNG for screenshots."""
    kind_id = 0 if spec.kind == "photo" else 1
    rng = np.random.default_rng([seed, 2, kind_id, spec.width, spec.height, spec.variant])
    buf = io.BytesIO()
    if spec.kind == "photo":
        _draw_photo(rng, spec.width, spec.height).save(buf, format="JPEG", quality=90)
        mime = "image/jpeg"
    else:
        # compress_level 1: PNG's default level costs ~10x the time for a few percent of bytes.
        _draw_screenshot(rng, spec.width, spec.height).save(buf, format="PNG", compress_level=1)
        mime = "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _question(rng: np.random.Generator, words: int) -> str:
    start = _QUESTION_STARTS[rng.integers(len(_QUESTION_STARTS))].split()
    body = [_WORDS[i] for i in rng.integers(len(_WORDS), size=max(0, words - len(start)))]
    return " ".join([*start, *body])[: 20 * words] + "?"


def _color(rng: np.random.Generator, low: int = 0, high: int = 256) -> tuple[int, int, int]:
    r, g, b = rng.integers(low, high, size=3)
    return int(r), int(g), int(b)


def _draw_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    scale = _RENDER_LONG_SIDE / max(width, height)
    w, h = max(8, round(width * scale)), max(8, round(height * scale))
    # A diagonal two-colour gradient with grain, like sky-to-ground lighting.
    a, b = np.array(_color(rng), np.float32), np.array(_color(rng), np.float32)
    t = (np.linspace(0, 1, w)[None, :] * 0.4 + np.linspace(0, 1, h)[:, None] * 0.6)[..., None]
    pixels = a * (1 - t) + b * t + rng.normal(0, 12, size=(h, w, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(w // 8, w // 2)), y0 + int(rng.integers(h // 8, h // 2))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=_color(rng))
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=_color(rng))
        else:
            pts = [(int(rng.integers(w)), int(rng.integers(h))) for _ in range(3)]
            draw.polygon(pts, fill=_color(rng))
    return img.resize((width, height), Image.Resampling.BICUBIC)


def _draw_screenshot(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    # Drawn at half size and scaled up with nearest neighbour: crisp edges, a quarter of the work.
    w, h = max(8, width // 2), max(8, height // 2)
    dark = rng.random() < 0.3
    bg = _color(rng, 10, 50) if dark else _color(rng, 225, 256)
    ink = _color(rng, 170, 230) if dark else _color(rng, 20, 90)
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    bar = max(4, h // 20)
    draw.rectangle((0, 0, w, bar), fill=_color(rng))  # title bar / status bar
    panels = int(rng.integers(1, 4))
    for p in range(panels):
        px0, px1 = p * w // panels + 4, (p + 1) * w // panels - 4
        if rng.random() < 0.4:  # a picture or chart block inside the panel
            by = int(rng.integers(bar + 4, max(bar + 5, h // 2)))
            draw.rectangle((px0, by, px1, by + h // 6), fill=_color(rng))
        # Text-like noise: rows of word-sized blocks.
        line_h = int(rng.integers(6, 12))
        for y in range(bar + 6, h - line_h, line_h * 2):
            x = px0
            while x < px1 - 10 and rng.random() > 0.03:
                word = int(rng.integers(4, 28))
                draw.rectangle((x, y, min(x + word, px1), y + line_h - 2), fill=ink)
                x += word + int(rng.integers(3, 7))
    return img.resize((width, height), Image.Resampling.NEAREST)
