"""Whether a layer may hand a tensor to a Triton kernel.

Contract: ``triton_enabled(t)`` is true when ``t`` lives on a CUDA device, Triton imports, and
``GLIMPSE_DISABLE_TRITON`` was not set to a non-empty value other than ``0`` when this module was
first imported. The variable is read once here (tests flip ``TRITON_DISABLED`` instead); Triton is
imported on the first CUDA query only, so CPU-only processes never pay for it. Kernel switches
read from the environment live here too: ``FP8_ACTIVATIONS`` (``GLIMPSE_FP8_ACTIVATIONS``).

What does not belong here: per-kernel shape or dtype checks (each kernel wrapper owns those).
"""

from __future__ import annotations

import os

import torch

TRITON_DISABLED: bool = os.environ.get("GLIMPSE_DISABLE_TRITON", "") not in ("", "0")
# W8A8 (e4m3 activations) in the fused FP8 experts for prefill-sized batches
# (``kernels/fused_moe.py``): on unless ``GLIMPSE_FP8_ACTIVATIONS=0`` (W8A16 then)
FP8_ACTIVATIONS: bool = os.environ.get("GLIMPSE_FP8_ACTIVATIONS", "1") != "0"

_triton_available: bool | None = None


def triton_enabled(t: torch.Tensor) -> bool:
    if TRITON_DISABLED or not t.is_cuda:
        return False
    return _has_triton()


def _has_triton() -> bool:
    global _triton_available
    if _triton_available is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton_available = False
        else:
            _triton_available = True
    return _triton_available
