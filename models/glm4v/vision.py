"""GLM-4.5V / GLM-4.6V vision tower: pixels of patches -> one embedding per 2x2 merged patch.

Contract: ``VisionTower(cfg).forward(pixel_values [N, patch_dim], grid_thw [M, 3] int64)`` returns
``[N / merge**2, out_hidden]``. Each ``grid_thw`` row (t, h, w) describes one image (t == 1) or
one video (t temporal patches); its patches are laid out by the processor in merge-block order.
Attention is bidirectional inside one segment and never crosses segments: a segment is one image
or one temporal patch of a video (h*w patches), so a video of t temporal patches is t segments.

On CUDA at inference the rotary runs in place on the fused qkv rows (``kernels/rotary.py``'s
float32 variant, rounded once like the torch ops), each residual add rides in the next RMSNorm
kernel, each SwiGLU (block MLPs and the merger) is one gate|up GEMM and one SiLU-mul kernel, and
same-sized segments (a batch of equal images) attend in one batched SDPA call over strided views;
training and CPU keep the plain torch ops. The patch embedding and the downsample conv are
kernel == stride convolutions, so each runs as one GEMM over views of its input.

Names: ``state_dict()`` keys equal the checkpoint names after ``model.visual.``
(``patch_embed.proj.weight`` [hidden, C, T, P, P], ``blocks.{i}.mlp.gate_proj.weight``, ...) and
``load_state_dict`` takes them. Parameters equal them too except each SwiGLU's stacked
``gate_up_proj.weight`` [2I, D], which holds the checkpoint's ``gate_proj`` rows then its
``up_proj`` rows: a loader maps ``model.visual.X`` to ``visual.X``, ``gate_proj`` / ``up_proj``
to that weight's ``weight_loader`` with shard 0 / 1.

Not here: preprocessing (``processing/``), reading checkpoints and mapping their names
(``loader.py``, ``model.py``), batching across requests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kernels import rotary as rotary_kernel
from kernels.dispatch import triton_enabled
from models.glm4v.config import VisionConfig
from models.layers.activation import silu_and_mul
from models.layers.linear import check_shape, default_weight_loader
from models.layers.norm import RMSNorm

try:  # optional GPU dependency
    from flash_attn import flash_attn_varlen_func  # type: ignore
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

VISION_ROPE_THETA = 10000.0


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride == patch, kept as a Conv3d so the weight loads by name."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, patch_dim] -> [N, hidden]
        w = self.proj.weight
        # a kernel-sized, stride-sized conv over one patch is a matmul over its (C, T, P, P) values
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


class PositionEmbedding(nn.Module):
    """Learned square table of absolute positions, bicubically resampled to each image's grid."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.hidden_size)

    def forward(
        self,
        h_pos: torch.Tensor,  # [N] int64, patch row within its image's grid
        w_pos: torch.Tensor,  # [N] int64, patch column
        grid_h: torch.Tensor,  # [N] float32, its image's grid height (patches)
        grid_w: torch.Tensor,  # [N] float32
    ) -> torch.Tensor:  # [N, hidden] in the table's dtype
        table = self.position_embedding.weight
        side = int(round(table.shape[0] ** 0.5))
        grid_img = table.view(side, side, -1).permute(2, 0, 1).unsqueeze(0).float()
        x = (w_pos.float() + 0.5) / grid_w * 2 - 1
        y = (h_pos.float() + 0.5) / grid_h * 2 - 1
        grid = torch.stack((x, y), dim=-1).view(1, -1, 1, 2)
        out = F.grid_sample(
            grid_img, grid, mode="bicubic", align_corners=False, padding_mode="border"
        )  # [1, hidden, N, 1]
        return out[0, :, :, 0].t().to(table.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Rope(NamedTuple):
    """2-D rotary tables of one forward, built once and shared by every block."""

    # float32; in_place: [N, 1, head_dim / 2] for the in-place kernel, else [N, 1, head_dim]
    # with the two halves equal (the torch ops)
    cos: torch.Tensor
    sin: torch.Tensor
    in_place: bool


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden]
        rope: _Rope,
        segments: _Segments,
    ) -> torch.Tensor:  # [N, hidden]
        n, h, d = x.shape[0], self.num_heads, self.head_dim
        qkv = self.qkv(x).view(n, 3 * h, d)
        if rope.in_place:
            # q and k heads are adjacent in each row: rotate them in place, one kernel
            rotary_kernel.rotary_f32_(qkv[:, : 2 * h], rope.cos, rope.sin, d)
            q, k, v = qkv.view(n, 3, h, d).unbind(1)
        else:
            q, k, v = qkv.view(n, 3, h, d).unbind(1)
            q = (q.float() * rope.cos + _rotate_half(q.float()) * rope.sin).to(x.dtype)
            k = (k.float() * rope.cos + _rotate_half(k.float()) * rope.sin).to(x.dtype)
        if _use_flash(q):
            # q, k and v alike are strided views of the qkv rows (last dim contiguous), a
            # layout flash-attn reads as is: no copy of v
            out = flash_attn_varlen_func(
                q, k, v,
                cu_seqlens_q=segments.cu_seqlens, cu_seqlens_k=segments.cu_seqlens,
                max_seqlen_q=segments.max_len, max_seqlen_k=segments.max_len,
                softmax_scale=self.scale, causal=False,
            )  # fmt: skip
        elif segments.padded:
            qh, kh, vh = (t[segments.index].transpose(1, 2) for t in (q, k, v))  # [S, H, L, D]
            o = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=segments.mask, scale=self.scale
            )
            out = o.transpose(1, 2)[segments.valid]  # segments in order: the packed layout
        elif segments.uniform:
            # equal segments (a batch of same-sized images) are one batched SDPA call over
            # strided views: no gather, no copies in or out
            s_, l_ = len(segments.bounds), segments.max_len
            qh, kh, vh = (t.view(s_, l_, h, d).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qh, kh, vh, scale=self.scale)
            return self.proj(o.transpose(1, 2).reshape(n, -1))
        else:
            out = torch.empty_like(q)
            for s, e in segments.bounds:
                # NOTE: 4-D [1, H, L, D] inputs: 3-D ones make SDPA fall back to its math
                # kernel on CUDA, which materialises the L x L scores (6x slower at 1120 px).
                qh, kh, vh = (t[s:e].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
                o = F.scaled_dot_product_attention(qh, kh, vh, scale=self.scale)
                out[s:e] = o[0].transpose(0, 1)
        return self.proj(out.reshape(n, -1))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with gate and up as one GEMM into one buffer.

    ``gate_up_proj.weight`` [2I, D] stacks the checkpoint's ``gate_proj.weight`` rows, then its
    ``up_proj.weight`` rows (no biases: GLM-4V's vision MLPs have none). Its ``weight_loader``
    copies one half (shard 0 = gate, 1 = up) or both stacked (shard None), and ``state_dict()`` /
    ``load_state_dict()`` speak the checkpoint's two names, so transformers' tower state loads
    as is and ours loads into transformers'. Replicated, not tensor-parallel: the tower runs
    whole on one device.
    """

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.gate_up_proj.weight.weight_loader = _load_gate_up
        self.down_proj = nn.Linear(inner, dim, bias=False)
        self.register_state_dict_post_hook(_split_gate_up)
        self.register_load_state_dict_pre_hook(_stack_gate_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, dim] -> [N, dim]
        # silu_and_mul reads the gate and up halves of the [N, 2I] output as strided views
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


_GATE_UP, _HALVES = "gate_up_proj.weight", ("gate_proj.weight", "up_proj.weight")


def _load_gate_up(param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None) -> None:
    """``param`` [2I, D] from the checkpoint's gate (shard 0) or up (1) tensor [I, D]."""
    if shard_id is None:
        default_weight_loader(param, loaded)
        return
    rows = param.shape[0] // 2
    check_shape(loaded, (rows, *param.shape[1:]))
    param.data.narrow(0, int(shard_id) * rows, rows).copy_(loaded)


def _split_gate_up(module: nn.Module, state: dict, prefix: str, _meta: object) -> None:
    fused = state.pop(prefix + _GATE_UP)
    for name, half in zip(_HALVES, fused.chunk(2, dim=0), strict=True):
        state[prefix + name] = half  # views of the stacked weight: no copy


def _stack_gate_up(module: nn.Module, state: dict, prefix: str, *_args: object) -> None:
    names = [prefix + n for n in _HALVES]
    if all(n in state for n in names):  # else load_state_dict reports what is missing
        state[prefix + _GATE_UP] = torch.cat([state.pop(n) for n in names])


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        # the block MLP is out_hidden_size wide (4096 in the real model), not intermediate_size
        self.mlp = SwiGLU(cfg.hidden_size, cfg.out_hidden_size)

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden], the previous block's MLP output
        residual: torch.Tensor | None,  # [N, hidden], the stream before x is added; None: first
        rope: _Rope,
        segments: _Segments,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (this block's MLP output, residual before it)
        # each residual add rides in the next norm (one fused kernel on CUDA)
        if residual is None:
            h, residual = self.norm1(x), x
        else:
            h, residual = self.norm1.add_forward(x, residual)
        h, residual = self.norm2.add_forward(self.attn(h, rope, segments), residual)
        return self.mlp(h), residual


class PatchMerger(SwiGLU):
    """``proj`` -> LayerNorm -> exact GELU -> the SwiGLU, whose ``gate_up_proj`` / ``down_proj``
    sit directly under ``merger.`` as the checkpoint's ``merger.gate_proj`` ... do."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__(dim, inner)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [M, dim] -> [M, dim]
        return super().forward(F.gelu(self.post_projection_norm(self.proj(x))))


class _Segments:
    """Attention segments of a packed batch: host bounds for SDPA, device offsets for flash, and
    (``padded``) a gather plan that lays every segment in a row of one padded batch, so a single
    masked SDPA call attends them all (many small segments; training)."""

    def __init__(self, lengths: list[int], device: torch.device, padded: bool = False) -> None:
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        self.bounds = list(zip(starts[:-1], starts[1:], strict=True))
        self.max_len = max(lengths) if lengths else 0
        self.cu_seqlens = torch.tensor(starts, dtype=torch.int32, device=device)
        self.padded = padded and len(lengths) > 1
        self.uniform = len(lengths) > 1 and len(set(lengths)) == 1
        if self.padded:
            n = torch.tensor(lengths, device=device)
            slot = torch.arange(self.max_len, device=device)
            self.valid = slot[None, :] < n[:, None]  # [S, L]
            # rows past a segment's end read its first patch; their outputs are dropped
            offset = torch.where(self.valid, slot[None, :], 0)
            self.index = self.cu_seqlens[:-1, None].long() + offset  # [S, L]
            self.mask = self.valid[:, None, None, :]  # [S, 1, 1, L] keys that exist


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.merge = cfg.spatial_merge_size
        self.patch_embed = PatchEmbed(cfg)
        self.post_conv_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.embeddings = PositionEmbedding(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.post_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.downsample = nn.Conv2d(
            cfg.hidden_size, cfg.out_hidden_size, kernel_size=self.merge, stride=self.merge
        )
        # NOTE: the weight [out, C, m, m] is kept channels-last (memory order out, m, m, C): the
        # order of a merge block's m*m consecutive C-wide patch rows, so the forward's GEMM
        # reads the activations and the weight where they lie, with no copy of either. .to()
        # and the loaders' copy_ keep the layout; a weight that lost it still computes right
        # (the forward's reshape then copies the weight, which is smaller than the activations).
        w = self.downsample.weight
        w.data = w.data.contiguous(memory_format=torch.channels_last)
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.intermediate_size)
        # one masked SDPA call over all segments padded to the longest (without flash-attn):
        # faster for many small images, as in training; the default loops over segments
        self.padded_attention = False

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.proj.weight.device

    def forward(
        self,
        pixel_values: torch.Tensor,  # [N, C*T*P*P] float
        grid_thw: torch.Tensor,  # [M, 3] int64, rows (t, h, w) in patches
    ) -> torch.Tensor:  # [N / merge**2, out_hidden]
        grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        expected = sum(t * h * w for t, h, w in grids)
        if pixel_values.shape[0] != expected:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but grid_thw describes {expected}"
            )
        device = pixel_values.device
        h_pos, w_pos, grid_h, grid_w = self._patch_positions(grids, device)
        lengths = [h * w for t, h, w in grids for _ in range(t)]

        x = self.patch_embed(pixel_values)
        segments = _Segments(lengths, device, padded=self.padded_attention and not _use_flash(x))
        x = self.post_conv_layernorm(x)
        x = x + self.embeddings(h_pos, w_pos, grid_h, grid_w).to(x.device)
        rope = self._rope(h_pos, w_pos, x)
        residual = None
        for block in self.blocks:
            x, residual = block(x, residual, rope, segments)
        x = (
            self.post_layernorm(x)
            if residual is None
            else self.post_layernorm.add_forward(x, residual).out
        )

        # each run of merge**2 consecutive patches is one merge block (processor layout): a
        # row of the [N / m**2, m*m*C] view, contracted with the weight in (m, m, C) order
        m, c = self.merge, x.shape[-1]
        w = self.downsample.weight  # [out, C, m, m], channels-last
        w2 = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # [out, m*m*C], a view
        x = F.linear(x.reshape(-1, m * m * c), w2, self.downsample.bias)  # a view: x is contiguous
        return self.merger(x)

    def _patch_positions(
        self, grids: list[tuple[int, int, int]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row/column of every patch in merge-block order, and its image's grid size.

        Built on the host and moved in one copy: per-item device ops would be many tiny kernels.
        """
        m = self.merge
        hs, ws, gh, gw = [], [], [], []
        for t, h, w in grids:
            rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
            cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
            hs.append(rows.transpose(1, 2).reshape(-1).repeat(t))
            ws.append(cols.transpose(1, 2).reshape(-1).repeat(t))
            gh.append(torch.full((t * h * w,), h))
            gw.append(torch.full((t * h * w,), w))
        packed = torch.stack([torch.cat(v) for v in (hs, ws, gh, gw)]).to(device)
        return packed[0], packed[1], packed[2].float(), packed[3].float()

    def _rope(self, h_pos: torch.Tensor, w_pos: torch.Tensor, x: torch.Tensor) -> _Rope:
        # built here in float32, not kept as a buffer that a .to(bfloat16) would round
        d = self.cfg.head_dim
        quarter = d // 4
        exponent = torch.arange(quarter, dtype=torch.float32, device=h_pos.device) / quarter
        inv = 1.0 / (VISION_ROPE_THETA**exponent)  # [head_dim/4]
        angles = torch.cat((h_pos[:, None].float() * inv, w_pos[:, None].float() * inv), dim=-1)
        cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)  # [N, 1, head_dim/2]
        # the in-place kernel serves inference only: training keeps the autograd-plain ops
        if (
            triton_enabled(x)
            and not torch.is_grad_enabled()
            and rotary_kernel.supported(x.view(x.shape[0], -1, d), cos, d, True)
        ):
            return _Rope(cos, sin, in_place=True)
        return _Rope(torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1), False)


def _use_flash(q: torch.Tensor) -> bool:
    return (
        flash_attn_varlen_func is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    )
