"""RMSNorm as GLM-4.5V computes it, alone or fused with the residual add before it.

Contract: ``RMSNorm(hidden)(x)`` normalises over the last dim in float32, casts the result back to
the input dtype and only then multiplies by the weight (the order matters for bf16 parity with
the reference). ``add_forward(x, residual)`` returns ``AddNormOutput(out, residual)`` with
``residual = x + residual`` (the next residual stream) and ``out`` its norm: one read and one
write of each row instead of an add plus a norm. On CUDA both run the Triton kernels of
``kernels/rmsnorm.py`` unless ``kernels.dispatch`` says no; elsewhere (and for mixed weight /
activation dtypes) the torch reference of that module.

What does not belong here: the kernels themselves (``kernels/``).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import rmsnorm
from kernels.dispatch import triton_enabled
from kernels.rmsnorm import AddNormOutput
from models.layers.linear import default_weight_loader

__all__ = ["AddNormOutput", "RMSNorm"]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., H], dtype of x
        if triton_enabled(x) and rmsnorm.supported(x, self.weight):
            return rmsnorm.rms_norm(x, self.weight, self.eps)
        return rmsnorm.rms_norm_reference(x, self.weight, self.eps)

    def add_forward(
        self,
        x: torch.Tensor,  # [..., H]
        residual: torch.Tensor,  # [..., H] dtype of x
    ) -> AddNormOutput:  # out = norm(x + residual), residual = x + residual
        if triton_enabled(x) and rmsnorm.supported(x, self.weight):
            return rmsnorm.add_rms_norm(x, residual, self.weight, self.eps)
        return rmsnorm.add_rms_norm_reference(x, residual, self.weight, self.eps)
