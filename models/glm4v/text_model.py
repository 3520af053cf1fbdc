"""The GLM-4.5V / GLM-4.6V MoE text decoder over a flat (varlen) batch.

Contract: ``Glm4vMoeTextModel(TextConfig, dtype).forward(input_ids [T], positions [3, T], meta,
inputs_embeds [T, H] | None) -> hidden [T, H]`` (final norm applied, no lm_head). Sequences are
packed back to back as ``meta`` describes; there is no padding. Layers below
``first_k_dense_replace`` use a dense SwiGLU MLP, the others the sigmoid-routed MoE plus an
always-on shared expert. Without expert parallelism the shared expert is held as extra slots of
the stacked routed experts (``mlp.experts``, ``num_shared``) and runs in the same expert
kernels; under expert parallelism it is a separate MLP (``mlp.shared_experts``). Attention: q/k/v with bias, o without, GQA, scale head_dim^-0.5,
partial M-RoPE. Parameter names mirror the checkpoint's after q/k/v and gate/up fusion
(``self_attn.qkv_proj``, ``mlp.gate_up_proj``, ``mlp.experts.w13_weight``...).

What does not belong here: checkpoint-name mapping and embedding injection (model.py), KV
cache allocation (the model runner), the vision tower.
"""

from __future__ import annotations

import torch
from torch import nn

from models.distributed import get_parallel_state, tensor_model_parallel_all_reduce
from models.glm4v.config import TextConfig
from models.layers.activation import SiluAndMul
from models.layers.attention import Attention, AttentionMetadata
from models.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    default_weight_loader,
)
from models.layers.moe import FusedMoE, TopKRouter
from models.layers.norm import RMSNorm
from models.layers.rotary import MRotaryEmbedding, RotaryCos


class Glm4vMoeAttention(nn.Module):
    def __init__(self, cfg: TextConfig, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            bias=cfg.attention_bias,
            dtype=dtype,
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False, dtype=dtype
        )
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5)

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        rope: RotaryCos,
        rotary: MRotaryEmbedding,
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H]
        qkv = self.qkv_proj(x)  # [T, (Hq + 2 Hk) * D], a fresh tensor this layer owns
        t, hq, hk = x.shape[0], self.num_heads, self.num_kv_heads
        heads = qkv.view(t, hq + 2 * hk, self.head_dim)  # q | k | v heads of each row
        q, k, v = heads[:, :hq], heads[:, hq : hq + hk], heads[:, hq + hk :]
        # on CUDA one kernel rotates q and k in place and writes k and v to the paged cache
        written = self.attn.rotate_and_cache_(
            heads, hq, rope.cos, rope.sin, rotary.rotary_dim, meta
        )
        if not written:
            rotary.apply_(heads[:, : hq + hk], rope)  # q and k heads are adjacent: together
        return self.o_proj(self.attn(q, k, v, meta, cache_written=written))


class Glm4vMoeMLP(nn.Module):
    """SwiGLU MLP: the dense layers' MLP and the MoE shared expert."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype | None,
        reduce_results: bool = True,
    ) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=False, dtype=dtype
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=False, reduce_results=reduce_results, dtype=dtype
        )
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        return self.down_proj(self.act(self.gate_up_proj(x)))


class Glm4vMoeSparseBlock(nn.Module):
    def __init__(self, cfg: TextConfig, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.gate = TopKRouter(
            cfg.hidden_size,
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
        state = get_parallel_state()
        # one shared expert of width n*I is n experts of width I (the down projection is linear
        # in the intermediate units), so it can ride in n extra stacked slots; under expert
        # parallelism each rank would hold it whole and the all-reduce would count it n times
        in_slots = not (state.expert_parallel and state.world_size > 1)
        self.num_shared = cfg.n_shared_experts
        self.experts = FusedMoE(
            cfg.n_routed_experts,
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            dtype=dtype,
            num_shared=cfg.n_shared_experts if in_slots else 0,
        )
        self.shared_experts = (
            Glm4vMoeMLP(
                cfg.hidden_size,
                cfg.moe_intermediate_size * cfg.n_shared_experts,
                dtype,
                reduce_results=False,
            )
            if cfg.n_shared_experts > 0 and not in_slots
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        # partial sum (the slotted shared expert included), rounded once to x's dtype
        out = self.experts(x, self.gate(x), out_dtype=x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        # one all-reduce for routed and shared partial sums
        return tensor_model_parallel_all_reduce(out)


class Glm4vMoeDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.self_attn = Glm4vMoeAttention(cfg, dtype)
        if cfg.is_moe_layer(layer_idx):
            self.mlp: nn.Module = Glm4vMoeSparseBlock(cfg, dtype)
        else:
            self.mlp = Glm4vMoeMLP(cfg.hidden_size, cfg.intermediate_size, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        rope: RotaryCos,
        rotary: MRotaryEmbedding,
        meta: AttentionMetadata,
        residual: torch.Tensor | None,  # [T, H] the stream before x is added; None: first layer
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (this layer's MLP output, residual before it)
        # the residual add rides in the next norm (one fused kernel on CUDA instead of two)
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm.add_forward(x, residual)
        x = self.self_attn(x, rope, rotary, meta)
        x, residual = self.post_attention_layernorm.add_forward(x, residual)
        return self.mlp(x), residual


class Glm4vMoeTextModel(nn.Module):
    def __init__(self, cfg: TextConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.config = cfg
        # NOTE: the embedding table is replicated on every rank (1.2 GB in bf16 for the real
        # model); a vocab-parallel embedding can replace it without touching the callers.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.embed_tokens.weight.weight_loader = default_weight_loader
        self.layers = nn.ModuleList(
            Glm4vMoeDecoderLayer(cfg, i, dtype) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.rotary_emb = MRotaryEmbedding(
            cfg.head_dim, cfg.rotary_dim, cfg.rope_theta, cfg.mrope_section
        )

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] int64 -> [T, H]
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,  # [T] int64
        positions: torch.Tensor,  # [3, T] or [T] int64
        meta: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,  # [T, H], replaces the token lookup
    ) -> torch.Tensor:  # [T, H]
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        rope = self.rotary_emb(positions, x.dtype)  # once per step, shared by every layer
        residual = None
        for layer in self.layers:
            x, residual = layer(x, rope, self.rotary_emb, meta, residual)
        return self.norm(x) if residual is None else self.norm.add_forward(x, residual).out
