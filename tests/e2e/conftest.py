"""End-to-end fixtures: one `glimpse serve` system per session, clients, media and the reference.

Contract: ``system`` is encoder + decoder + gateway started once by ``glimpse serve`` on the tiny
GLM-4.5V checkpoint (CPU, float32) with file:// media allowed under ``media_dir``, at most 3
images and 1 video per prompt and a 2048-token context. ``client`` is the official ``openai``
client pointed at its gateway; ``hf`` is transformers' model on the same checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_media import draw_image, write_video
from e2e_processes import MAX_IMAGES, MAX_MODEL_LEN, System, start_serve, stop


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    for i in range(3):
        draw_image(100 + i).save(root / f"picture_{i}.png")
    write_video(root / "clip.mp4")
    return root


@pytest.fixture(scope="session")
def system(tiny_ckpt_45: Path, media_dir: Path, tmp_path_factory) -> Iterator[System]:
    running = start_serve(
        tiny_ckpt_45,
        tmp_path_factory.mktemp("serve_logs"),
        "--allowed-local-media-path",
        str(media_dir),
        "--limit-mm-per-prompt",
        f"image={MAX_IMAGES},video=1",
        "--max-model-len",
        str(MAX_MODEL_LEN),
    )
    yield running
    stop(running)


@pytest.fixture(scope="session")
def client(system: System):
    from openai import OpenAI

    return OpenAI(base_url=system.v1, api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def model_name(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="session")
def hf(tiny_ckpt_45: Path):
    from e2e_reference import HFReference

    return HFReference(tiny_ckpt_45)
