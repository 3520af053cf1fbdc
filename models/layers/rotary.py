"""Partial NeoX-style multimodal rotary embedding (M-RoPE) of the GLM-4.5V text decoder.

Contract: ``MRotaryEmbedding(head_dim, rotary_dim, base, mrope_section)`` maps positions ``[3, T]``
(temporal, height, width) or plain ``[T]`` (text: t = h = w) to ``RotaryCos`` (cos/sin
``[T, 1, rotary_dim/2]``, computed in float32 then cast to the activation dtype) once per forward,
shared by every layer; ``apply(q, k, rope)`` returns rotated copies and ``apply_(x, rope)`` rotates
heads in place (the decoder's fresh q|k projection rows). Both rotate only the first
``rotary_dim`` dims of every head (rotate-half layout: dim i pairs with i + rotary_dim/2) and
pass the rest through. Frequency index j takes its position from the section it falls in:
t for the first ``mrope_section[0]`` indices, h for the next ``[1]``, w for the last ``[2]``
(contiguous sections, not interleaved). On CUDA ``apply_`` runs the Triton kernel of
``kernels/rotary.py`` (bit-identical rounding) unless ``kernels.dispatch`` says no; elsewhere that
module's torch reference.

What does not belong here: computing the 3-D positions from grids (processing/rope_index.py),
the vision tower's 2-D rotary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from kernels import rotary
from kernels.dispatch import triton_enabled


class RotaryCos(NamedTuple):
    cos: torch.Tensor  # [T, 1, rotary_dim/2] activation dtype (broadcasts over heads)
    sin: torch.Tensor  # [T, 1, rotary_dim/2] activation dtype


class MRotaryEmbedding(nn.Module):
    def __init__(
        self, head_dim: int, rotary_dim: int, base: float, mrope_section: tuple[int, ...]
    ) -> None:
        super().__init__()
        if rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and <= head_dim {head_dim}")
        if 2 * sum(mrope_section) != rotary_dim:
            raise ValueError(f"mrope_section {mrope_section} must sum to rotary_dim/2")
        self.head_dim, self.rotary_dim, self.base = head_dim, rotary_dim, base
        self.mrope_section = tuple(mrope_section)
        self.register_buffer("inv_freq", torch.empty(rotary_dim // 2), persistent=False)
        # which of (t, h, w) feeds each frequency index
        self.register_buffer("section_of", torch.empty(rotary_dim // 2, dtype=torch.long), False)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """(Re)compute the constant buffers; called again after meta-device materialisation."""
        if self.inv_freq.is_meta:
            return
        dev = self.inv_freq.device
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=dev)
        self.inv_freq.copy_(1.0 / (self.base ** (exponent / self.rotary_dim)))
        sections = [torch.full((n,), i, dtype=torch.long) for i, n in enumerate(self.mrope_section)]
        self.section_of.copy_(torch.cat(sections))

    def forward(
        self,
        positions: torch.Tensor,  # [3, T] or [T] int64
        dtype: torch.dtype = torch.float32,  # the activations' dtype
    ) -> RotaryCos:
        if positions.dim() == 1:
            pos = positions.float()[:, None]  # [T, 1] broadcast over all sections
        else:
            # [3, T] -> per frequency index the position of its section: [T, rotary_dim/2]
            pos = positions.float().index_select(0, self.section_of).t()
        angle = (pos * self.inv_freq)[:, None, :]  # [T, 1, rotary_dim/2] float32
        # cast to the activation dtype before any multiply, as the reference does; done here
        # once per forward instead of in every layer
        return RotaryCos(angle.cos().to(dtype), angle.sin().to(dtype))

    def apply(
        self, q: torch.Tensor, k: torch.Tensor, rope: RotaryCos
    ) -> tuple[torch.Tensor, torch.Tensor]:  # q [T, Hq, D], k [T, Hk, D], rotated copies
        q, k = q.clone(), k.clone()
        self.apply_(q, rope)
        self.apply_(k, rope)
        return q, k

    def apply_(self, x: torch.Tensor, rope: RotaryCos) -> None:  # x [T, H, D], rotated in place
        if triton_enabled(x) and rotary.supported(x, rope.cos, self.rotary_dim):
            rotary.rotary_(x, rope.cos, rope.sin, self.rotary_dim)
        else:
            rotary.rotary_reference_(x, rope.cos, rope.sin, self.rotary_dim)
