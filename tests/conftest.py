"""Session-wide pytest fixtures and hooks shared by every test package.

Contract: ``tiny_ckpt_45`` / ``tiny_ckpt_46`` are tiny random GLM-4.5V / GLM-4.6V checkpoints in
Hugging Face format, written once per session (seed 0) and returned as a ``Path``; tests must treat
them as read-only. Tests marked ``gpu`` are skipped when CUDA is not available.

Not here: fixtures used by a single package (put them in that package's own conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_ckpt_45(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.glm4v.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_glm45v"), seed=0, variant="glm4.5v")


@pytest.fixture(scope="session")
def tiny_ckpt_46(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.glm4v.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_glm46v"), seed=0, variant="glm4.6v")


_cuda_available: bool | None = None


def _has_cuda() -> bool:
    # torch is imported lazily so CPU-only packages (the gateway) can run without paying for it.
    global _cuda_available
    if _cuda_available is None:
        import torch

        _cuda_available = bool(torch.cuda.is_available())
    return _cuda_available


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None and not _has_cuda():
        pytest.skip("needs a CUDA device")
