"""Gated activations used by the MLPs.

Contract: ``silu_and_mul(x)`` / ``SiluAndMul()(x)`` take the fused gate|up output ``[..., 2I]``
and return ``silu(gate) * up`` ``[..., I]``; ``silu_mul(gate, up)`` takes the two halves as
separate ``[..., I]`` tensors (or strided views). On CUDA both run the one-pass Triton kernel of
``kernels/silu_mul.py`` unless ``kernels.dispatch`` says no or autograd is recording through
them (the kernel has no backward: training runs the torch ops); elsewhere the torch ops, which
the kernel matches.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import silu_mul as kernel
from kernels.dispatch import triton_enabled


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # [..., I] x2 -> [..., I]
    if gate.dim() >= 2 and triton_enabled(gate) and not _records_grad(gate, up):
        g2, u2 = gate.reshape(-1, gate.shape[-1]), up.reshape(-1, up.shape[-1])
        if kernel.supported(g2, u2):
            return kernel.silu_mul(g2, u2).view(gate.shape)
    return kernel.silu_mul_reference(gate, up)


def _records_grad(gate: torch.Tensor, up: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [..., 2I] -> [..., I]
    gate, up = x.chunk(2, dim=-1)
    return silu_mul(gate, up)


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., 2I] -> [..., I]
        return silu_and_mul(x)
