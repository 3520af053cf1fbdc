"""DeviceBudget: features fit until the limit, the rest go to the host, freed bytes come back."""

from __future__ import annotations

import gc
import threading

import pytest
import torch

from encoder_service.transport.device_budget import DeviceBudget


def features(rows: int) -> torch.Tensor:  # rows x 8 bfloat16: 16 bytes a row
    return torch.randn(rows, 8).bfloat16()


def test_features_fit_until_the_limit_then_overflow() -> None:
    budget = DeviceBudget(limit_bytes=100)
    a = budget.place(features(3), "cpu")  # 48 bytes
    b = budget.place(features(3), "cpu")  # 96
    assert budget.held == 96 and budget.overflowed == 0
    c = budget.place(features(1), "cpu")  # 112 would pass the limit
    assert budget.held == 96 and budget.overflowed == 1
    assert a.shape == b.shape == (3, 8) and c.shape == (1, 8)


def test_dropped_features_return_their_bytes() -> None:
    budget = DeviceBudget(limit_bytes=64)
    a = budget.place(features(4), "cpu")
    view = a[1:3]  # a view keeps the features alive
    del a
    gc.collect()
    assert budget.held == 64
    del view
    gc.collect()
    assert budget.held == 0
    kept = budget.place(features(4), "cpu")
    assert budget.held == 64 and budget.overflowed == 0 and kept.numel() == 32


def test_values_are_kept_whichever_side_they_land_on() -> None:
    budget = DeviceBudget(limit_bytes=16)
    src = [features(1), features(2)]
    out = [budget.place(t, "cpu") for t in src]
    assert all(torch.equal(a, b) for a, b in zip(src, out, strict=True))
    assert budget.overflowed == 1


def test_releases_from_other_threads_are_counted() -> None:
    budget = DeviceBudget(limit_bytes=1 << 20)
    held = [budget.place(features(4), "cpu") for _ in range(64)]
    assert budget.held == 64 * 64

    def drop(part: list[torch.Tensor]) -> None:
        part.clear()

    parts = [held[i::4] for i in range(4)]
    del held
    threads = [threading.Thread(target=drop, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    gc.collect()
    assert budget.held == 0


def test_a_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        DeviceBudget(limit_bytes=-1)


@pytest.mark.gpu
def test_gpu_features_go_to_the_host_past_the_limit() -> None:
    budget = DeviceBudget(limit_bytes=64)
    on_gpu = budget.place(features(4), "cuda")
    parked = budget.place(features(1), "cuda")
    assert on_gpu.device.type == "cuda" and parked.device.type == "cpu"
    del on_gpu
    gc.collect()
    assert budget.place(features(4), "cuda").device.type == "cuda"
