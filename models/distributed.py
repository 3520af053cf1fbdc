"""Tensor-parallel group state and the collectives the parallel layers use.

Contract: one process per rank calls ``init_distributed(backend, world_size, rank, init_method)``
before building the model; the parallel layers read ``get_tp_rank()`` / ``get_tp_size()`` at
construction and call ``tensor_model_parallel_all_reduce`` / ``..._all_gather`` in forward.
World size 1 never creates a process group: every collective is then the identity, so the
single-process path (tests, the encoder, one-GPU serving) needs no torch.distributed at all.
Expert parallelism reuses the tensor-parallel group: with ``expert_parallel=True`` the routed
experts are split whole across the ranks instead of being sliced along their hidden width.

What does not belong here: broadcasting scheduler batches (the engine's job), layer logic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1
    expert_parallel: bool = False  # routed experts split whole across ranks (EP) instead of TP
    group: dist.ProcessGroup | None = None  # None when world_size == 1


# NOTE: process-wide, set once before the model is built; never per-step state.
_STATE = ParallelState()


def init_distributed(
    backend: str = "gloo",
    world_size: int = 1,
    rank: int = 0,
    init_method: str | None = None,
    expert_parallel: bool = False,
) -> ParallelState:
    """Join the tensor-parallel group (all ranks of the job) and remember it for the layers."""
    global _STATE
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    if world_size == 1:
        _STATE = ParallelState(expert_parallel=expert_parallel)
        return _STATE
    if backend == "nccl":
        # one rank per GPU on the host; the caller may restrict visible devices beforehand
        torch.cuda.set_device(rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=init_method or "env://",
            world_size=world_size,
            rank=rank,
        )
    _STATE = ParallelState(
        rank=rank,
        world_size=world_size,
        expert_parallel=expert_parallel,
        group=dist.group.WORLD,
    )
    return _STATE


def destroy_distributed() -> None:
    """Leave the process group (if any) and return to the single-process state."""
    global _STATE
    if _STATE.group is not None and dist.is_initialized():
        dist.destroy_process_group()
    _STATE = ParallelState()


def get_parallel_state() -> ParallelState:
    return _STATE


def get_tp_rank() -> int:
    return _STATE.rank


def get_tp_size() -> int:
    return _STATE.world_size


def get_tp_group() -> dist.ProcessGroup | None:
    return _STATE.group


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel ranks (in place when there is more than one)."""
    if _STATE.world_size == 1:
        return x
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=_STATE.group)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate each rank's ``x`` along ``dim`` in rank order."""
    if _STATE.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.world_size)]
    dist.all_gather(parts, x.contiguous(), group=_STATE.group)
    return torch.cat(parts, dim=dim)


def divide(numerator: int, denominator: int, what: str) -> int:
    """Exact division for shard sizes; a remainder means the layout cannot be split."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by {denominator}")
    return numerator // denominator
