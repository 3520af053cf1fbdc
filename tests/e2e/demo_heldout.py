"""The embedded demo model's held-out set: scenes drawn from a seed its training never used.

``heldout_cases(root)`` draws ``PER_KIND`` examples of every question kind with
``scenes.make_example`` from ``HELDOUT_SEED`` and writes each picture as PNG (and each video as
H.264 MP4, made with PyAV) under ``root``. Every case knows its question, the right answer and
how to send its media as a ``data:`` URL or a ``file://`` URL.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from e2e_media import data_url, image_part, text_part, video_part

from models.glm4v.demo import scenes

# The trainer draws from seeds s * 1000 + worker (s the run's seed, or seed + 1) and evaluates
# on 10_000; this one is none of them.
HELDOUT_SEED = 424_242
PER_KIND = {"shape": 40, "color": 40, "count": 40, "motion": 30, "describe": 20}
# the accuracy each kind must reach through every path (describe is reported, not scored)
TARGET = {"shape": 0.95, "color": 0.95, "count": 0.95, "motion": 0.90}


@dataclass(frozen=True)
class Case:
    id: str
    kind: str
    question: str
    answer: str
    path: Path
    mime: str

    @property
    def is_video(self) -> bool:
        return self.mime.startswith("video/")

    def media_part(self, how: str) -> dict:
        url = data_url(self.path.read_bytes(), self.mime) if how == "data" else self.path.as_uri()
        return video_part(url) if self.is_video else image_part(url)

    def messages(self, how: str) -> list[dict]:
        return [{"role": "user", "content": [self.media_part(how), text_part(self.question)]}]


def write_mp4(frames: list, fps: float, path: Path) -> None:
    """H.264 at near-lossless quality; yuv420p needs even sides, so an odd row/column is cut."""
    arrays = [np.asarray(f) for f in frames]
    h, w = arrays[0].shape[0] // 2 * 2, arrays[0].shape[1] // 2 * 2
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=int(fps), options={"crf": "12"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for a in arrays:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(a[:h, :w]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def heldout_cases(root: Path) -> list[Case]:
    rng = random.Random(HELDOUT_SEED)
    cases = []
    for kind, n in PER_KIND.items():
        for i in range(n):
            ex = scenes.make_example(rng, kind)
            name = f"{kind}_{i:02d}"
            if ex.image is not None:
                path, mime = root / f"{name}.png", "image/png"
                ex.image.save(path)
            else:
                path, mime = root / f"{name}.mp4", "video/mp4"
                write_mp4(ex.frames, ex.fps, path)
            cases.append(Case(name, kind, ex.question, ex.answer, path, mime))
    return cases


def accuracy(cases: list[Case], answers: dict[str, str]) -> dict[str, float]:
    hits, total = defaultdict(int), defaultdict(int)
    for c in cases:
        total[c.kind] += 1
        hits[c.kind] += right(c, answers)
    return {k: hits[k] / total[k] for k in total}


def misses(cases: list[Case], answers: dict[str, str]) -> list[str]:
    return [f"{c.id}: {answers[c.id]!r} != {c.answer!r}" for c in cases if not right(c, answers)]


def right(case: Case, answers: dict[str, str]) -> bool:
    return answers[case.id].strip() == case.answer


def below(acc: dict[str, float], limits: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in acc.items() if k in limits and v < limits[k]}
