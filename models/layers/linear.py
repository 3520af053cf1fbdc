"""Linear layers that know how they are split across tensor-parallel ranks.

Contract: every parameter carries ``param.weight_loader(param, loaded, shard_id=None)`` which
takes the *full* checkpoint tensor (any float dtype; it is cast to the parameter's dtype),
checks its shape against the unsharded layout, slices the part that belongs to this rank and
copies it into place. A wrong shape raises ``CheckpointError`` with both shapes; the caller adds
the tensor name. Layouts (Megatron style):
- ``ColumnParallelLinear``: output rows split; ``MergedColumnParallelLinear`` stacks several
  column-parallel outputs (gate|up) and splits each one separately.
- ``QKVParallelLinear``: q|k|v stacked; query heads split, kv heads split when there are at least
  as many as ranks, otherwise each kv head is replicated on the ranks that use it (GQA).
- ``RowParallelLinear``: input columns split, partial outputs summed by an all-reduce; the bias
  is added once, after the sum.

Column and row layers carry ``quant_method`` (None = plain GEMM in the weight's dtype); FP8
weights (``models/layers/fp8.py``) set it, and the forward then calls ``quant_method.apply``.

What does not belong here: quantized weight formats and their GEMMs (fp8.py), names of
checkpoint tensors (the model maps them), attention or MLP wiring.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.distributed import (
    divide,
    get_tp_rank,
    get_tp_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from models.glm4v.errors import CheckpointError


def check_shape(loaded: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise CheckpointError(
            f"expected shape {list(expected)}, checkpoint has {list(loaded.shape)}"
        )


def default_weight_loader(
    param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None
) -> None:
    """Replicated parameter: the checkpoint tensor is copied whole."""
    check_shape(loaded, tuple(param.shape))
    param.data.copy_(loaded)


def _matmul(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    method = layer.quant_method
    if method is None:
        return F.linear(x, layer.weight, bias)
    return method.apply(layer, x, bias)


def _new_param(shape: tuple[int, ...], dtype: torch.dtype | None, loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader
    return p


class ReplicatedLinear(nn.Module):
    """Full weight on every rank (router gates, vision projections)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = _new_param((output_size, input_size), dtype, default_weight_loader)
        self.bias = _new_param((output_size,), dtype, default_weight_loader) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(nn.Module):
    """Output features split across ranks; ``gather_output`` concatenates them back."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        gather_output: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, self.tp_size, "output size")
        self.gather_output = gather_output
        rows = self.output_size_per_partition
        self.weight = _new_param((rows, input_size), dtype, self.weight_loader)
        self.bias = _new_param((rows,), dtype, self.weight_loader) if bias else None
        self.quant_method = None  # set by a quantized weight format (fp8.py)

    def weight_loader(
        self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None
    ) -> None:
        check_shape(loaded, (self.output_size, *param.shape[1:]))
        rows = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp_rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out(/tp)]
        y = _matmul(self, x, self.bias)
        return tensor_model_parallel_all_gather(y, dim=-1) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul, e.g. gate|up; ``shard_id`` is the index."""

    def __init__(
        self,
        input_size: int,
        output_sizes: list[int],
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias=bias, dtype=dtype)
        for size in self.output_sizes:
            divide(size, self.tp_size, "merged output size")

    def weight_loader(
        self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None
    ) -> None:
        if shard_id is None:  # already-fused checkpoint tensor
            fused = loaded.split(self.output_sizes, dim=0)
            check_shape(loaded, (self.output_size, *param.shape[1:]))
            for i, part in enumerate(fused):
                self.weight_loader(param, part, i)
            return
        idx = int(shard_id)
        full = self.output_sizes[idx]
        check_shape(loaded, (full, *param.shape[1:]))
        size = full // self.tp_size
        offset = sum(self.output_sizes[:idx]) // self.tp_size
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q|k|v projection with GQA-aware sharding; ``shard_id`` is "q", "k" or "v"."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        tp_size = get_tp_size()
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp_size, "attention heads")
        if total_num_kv_heads >= tp_size:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size, "kv heads")
            self.kv_replicas = 1
        else:
            # fewer kv heads than ranks: each kv head serves tp_size/total ranks
            self.num_kv_heads = 1
            self.kv_replicas = divide(tp_size, total_num_kv_heads, "ranks per kv head")
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, out, bias=bias, dtype=dtype)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim

    def weight_loader(
        self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None
    ) -> None:
        if shard_id is None:  # already-fused checkpoint tensor (full q|k|v)
            q, kv = self.total_num_heads * self.head_dim, self.total_num_kv_heads * self.head_dim
            check_shape(loaded, (q + 2 * kv, *param.shape[1:]))
            for sid, part in zip("qkv", loaded.split([q, kv, kv], dim=0), strict=True):
                self.weight_loader(param, part, sid)
            return
        if shard_id == "q":
            full, size, offset = self.total_num_heads * self.head_dim, self.q_size, 0
            start = self.tp_rank * size
        elif shard_id in ("k", "v"):
            full, size = self.total_num_kv_heads * self.head_dim, self.kv_size
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            start = (self.tp_rank // self.kv_replicas) * size
        else:
            raise ValueError(f"unknown qkv shard {shard_id!r}")
        check_shape(loaded, (full, *param.shape[1:]))
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, start, size))


class RowParallelLinear(nn.Module):
    """Input features split across ranks; partial products are summed across ranks."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        reduce_results: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, self.tp_size, "input size")
        # NOTE: with reduce_results=False the caller owns the all-reduce (the MoE block sums
        # routed and shared experts first) and must add no bias per rank.
        self.reduce_results = reduce_results
        cols = self.input_size_per_partition
        self.weight = _new_param((output_size, cols), dtype, self.weight_loader)
        self.bias = _new_param((output_size,), dtype, default_weight_loader) if bias else None
        self.quant_method = None  # set by a quantized weight format (fp8.py)

    def weight_loader(
        self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object = None
    ) -> None:
        check_shape(loaded, (self.output_size, self.input_size))
        cols = self.input_size_per_partition
        param.data.copy_(loaded.narrow(1, self.tp_rank * cols, cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in/tp] -> [T, out]
        y = _matmul(self, x, None)
        if self.reduce_results:
            y = tensor_model_parallel_all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
