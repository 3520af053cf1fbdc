"""Fixtures for decoder engine tests: our tiny model and the transformers reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_reference import Reference


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
