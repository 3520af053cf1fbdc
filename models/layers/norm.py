"""RMSNorm as GLM-4.5V computes it.

Contract: ``RMSNorm(hidden)(x)`` normalises over the last dim in float32, casts the result back to
the input dtype and only then multiplies by the weight (the order matters for bf16 parity with
the reference). Fused residual-add kernels belong in ``kernels/``, not here.
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H], dtype of x
        xf = x.float()
        scale = xf.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()  # [..., 1] float32
        out = (xf * scale).to(x.dtype)  # a fresh tensor either way: scale it in place
        if out.dtype != self.weight.dtype:  # mixed dtypes: keep torch's type promotion
            return self.weight * out
        return out.mul_(self.weight)
