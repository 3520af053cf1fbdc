"""Fixtures for decoder engine tests: our tiny model, the transformers reference, and sixteen
mixed prompts with their reference tokens (``specs``, ``expected``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_reference import PromptSpec, Reference, draw_image, write_video


@pytest.fixture(scope="session")
def reference(tiny_ckpt_45: Path) -> Reference:
    return Reference(tiny_ckpt_45)


@pytest.fixture(scope="session")
def reference_46(tiny_ckpt_46: Path) -> Reference:
    return Reference(tiny_ckpt_46)


@pytest.fixture(scope="session")
def ours(tiny_ckpt_45: Path):
    """(model, model config, tokenizer) of our implementation, text half only."""
    from tokenizers import Tokenizer

    from models.glm4v.config import load_model_config
    from models.glm4v.loader import load_model

    model = load_model(tiny_ckpt_45, dtype=torch.float32, device="cpu", vision=False)
    tok = Tokenizer.from_file(str(tiny_ckpt_45 / "tokenizer.json"))
    return model, load_model_config(tiny_ckpt_45), tok


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tiny model's matmuls are far too small for intra-op threads; on a shared 2-core
    # machine two threads only contend with each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PREFIX = "Read the following question carefully and answer it in one short sentence. " * 3


@pytest.fixture(scope="module")
def specs(reference, tmp_path_factory) -> list[tuple[PromptSpec, int]]:
    d = tmp_path_factory.mktemp("media")
    im = [
        draw_image(*wh, seed)
        for seed, wh in enumerate([(90, 60), (200, 120), (40, 300), (160, 160), (300, 220)])
    ]
    va = write_video(d / "a.mp4", frames=12, fps=6)
    vb = write_video(d / "b.mp4", frames=20, fps=5, width=96, height=64)
    prompts = [
        [("text", "Hello there")],
        [("text", PREFIX + "What colour is the sky?")],
        [("text", PREFIX + "How many legs does a cat have?")],
        [("image", im[0]), ("text", "What is this?")],
        [("image", im[0]), ("text", "What is this?")],  # exact repeat of the previous one
        [("image", im[1]), ("text", "Describe the picture in detail.")],
        [("image", im[2]), ("text", "Is this tall?")],
        [("image", im[3]), ("text", "Compare with"), ("image", im[0])],
        [("video", va), ("text", "Describe the video.")],
        [("video", vb), ("text", "What happens?")],
        [("text", "Look at this: "), ("image", im[1])],
        [("image", im[0]), ("text", "A different question about it.")],
        [("image", im[4]), ("text", "Count the squares.")],
        [("text", PREFIX + "Name a prime number.")],
        [("video", va), ("text", "Another question about the clip.")],
        [("image", im[1]), ("image", im[2]), ("text", "Which is wider?")],
    ]
    return [(reference.build(p), 5 + i % 4) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def expected(reference, specs) -> list[list[int]]:
    return [reference.generate(spec, n) for spec, n in specs]
