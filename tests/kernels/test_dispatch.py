"""``kernels.dispatch``: Triton only for CUDA tensors, and off when the environment says so."""

from __future__ import annotations

import importlib

import pytest
import torch

from kernels import dispatch


def test_cpu_tensors_keep_the_torch_path() -> None:
    assert not dispatch.triton_enabled(torch.zeros(2))


@pytest.mark.parametrize(("value", "disabled"), [("1", True), ("0", False), ("", False)])
def test_environment_variable_is_read_at_import(
    monkeypatch: pytest.MonkeyPatch, value: str, disabled: bool
) -> None:
    monkeypatch.setenv("GLIMPSE_DISABLE_TRITON", value)
    try:
        importlib.reload(dispatch)
        assert dispatch.TRITON_DISABLED is disabled
    finally:
        monkeypatch.undo()
        importlib.reload(dispatch)  # back to this process's own setting


@pytest.mark.gpu
def test_cuda_tensors_take_triton_unless_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(2, device="cuda")
    monkeypatch.setattr(dispatch, "TRITON_DISABLED", False)
    assert dispatch.triton_enabled(x)
    monkeypatch.setattr(dispatch, "TRITON_DISABLED", True)
    assert not dispatch.triton_enabled(x)
