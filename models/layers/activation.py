"""Gated activations used by the MLPs.

Contract: ``SiluAndMul()(x)`` takes the fused gate|up output ``[..., 2I]`` and returns
``silu(gate) * up`` ``[..., I]``. A fused kernel may replace the body later; callers stay the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [..., 2I] -> [..., I]
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., 2I] -> [..., I]
        return silu_and_mul(x)
