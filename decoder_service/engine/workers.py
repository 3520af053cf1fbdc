"""Worker ranks 1..tp-1 of a tensor-parallel engine, and the messages rank 0 sends them.

Contract: ``worker_main(index, spec)`` is the entry of each spawned process (rank ``index + 1``).
It joins the group (``join_group``: the device group is NCCL on GPU, gloo on CPU; messages travel
on a second, gloo group), loads its shard of the text weights, signals readiness with a barrier
on the message group and then serves messages from rank 0 until ``ShutdownMessage``:
``StepMessage`` (the step's ``SchedulerOutput`` plus the media embeddings this rank has not seen
yet, broadcast as one flat tensor on the device group right after the message), ``ProfileMessage``
(GPU KV sizing, answered by a MIN all-reduce so the pool fits every rank), ``AllocateMessage``
(the pool size rank 0 decided) and ``DecodeMessage`` (decode settings: every rank captures the
same CUDA graphs, and a MIN all-reduce drops them everywhere if one rank failed to). A worker never samples: rank 0 alone turns logits into tokens,
and the next step carries them back in ``ScheduledSequence.token_ids``. Any exception ends the
process; rank 0 notices the closed connection (or the dead process) and raises.
Not here: the rank-0 side (``parallel.py``), scheduling, the model's own collectives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from decoder_service.engine.cli_args import resolve_device, resolve_dtype
from decoder_service.engine.config import LoadConfig, ParallelConfig
from decoder_service.engine.cuda_graphs import DecodeSettings
from decoder_service.engine.model_runner import ModelRunner
from decoder_service.engine.scheduler import SchedulerOutput
from models.distributed import destroy_distributed, init_distributed
from models.glm4v.loader import load_model

log = logging.getLogger(__name__)

# NOTE: a worker waits on the message group for as long as the engine is idle (a server with no
# traffic), so that group must not time out; a dead peer still fails it at once because its TCP
# connection closes.
IDLE_TIMEOUT = timedelta(days=3650)


@dataclass(frozen=True)
class WorkerSpec:
    """All a worker needs to join the group and load its shard (pickled into the process)."""

    load: LoadConfig
    parallel: ParallelConfig
    block_size: int  # tokens per KV block, as on rank 0
    num_threads: int  # CPU intra-op threads, as on rank 0


@dataclass
class StepMessage:
    out: SchedulerOutput  # the step, including requests to create and drop
    # media rows that follow on the device group as one [sum(rows), hidden] tensor, in order
    media: list[tuple[str, int, int]]  # (request id, item index, rows)


@dataclass(frozen=True)
class ProfileMessage:
    max_num_batched_tokens: int
    max_num_seqs: int
    mem_fraction_static: float


@dataclass(frozen=True)
class AllocateMessage:
    num_blocks: int  # decided by rank 0; every rank allocates its kv-head shard of this many


@dataclass(frozen=True)
class DecodeMessage:
    settings: DecodeSettings  # sent once, after AllocateMessage: graphs capture over the cache


@dataclass(frozen=True)
class ShutdownMessage:
    pass


Message = StepMessage | ProfileMessage | AllocateMessage | DecodeMessage | ShutdownMessage


class RankGroups(NamedTuple):
    messages: dist.ProcessGroup  # gloo, never times out: pickled messages, barriers
    device: dist.ProcessGroup  # the tensor-parallel group (NCCL on GPU): tensors


def rank_device(load: LoadConfig, rank: int) -> torch.device:
    """Rank r runs on cuda:r (``CUDA_VISIBLE_DEVICES`` picks the GPUs), or on the CPU."""
    device = resolve_device(load.device)
    if device.type != "cuda":
        return device
    if device.index not in (None, 0):
        raise ValueError(
            f"with tensor parallelism rank r uses cuda:r; got --device {load.device} "
            "(choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    return torch.device("cuda", rank)


def load_text_model(load: LoadConfig, device: torch.device) -> torch.nn.Module:
    """The decoder's model as ``load`` describes it, on ``device``: text side only (encoders
    run the vision tower)."""
    return load_model(
        load.model_path,
        resolve_dtype(load.dtype, device),
        device,
        load.load_format,
        vision=False,
        text=True,
        seed=load.seed,
        quantization=load.quantization,
    )


def join_group(spec: WorkerSpec, rank: int) -> RankGroups:
    """Rendezvous through MASTER_ADDR/MASTER_PORT and set up the model's parallel state."""
    device = rank_device(spec.load, rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        init_method="env://",
        world_size=spec.parallel.tp,
        rank=rank,
        timeout=timedelta(seconds=spec.parallel.timeout_s),
    )
    # adopts the world group just created; the parallel layers read it when they are built
    init_distributed(backend, spec.parallel.tp, rank, expert_parallel=spec.parallel.expert_parallel)
    messages = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return RankGroups(messages, dist.group.WORLD)


def receive(groups: RankGroups) -> Message:
    box: list[Message | None] = [None]
    dist.broadcast_object_list(box, src=0, group=groups.messages)
    msg = box[0]
    if msg is None:
        raise RuntimeError("empty message from rank 0")
    return msg


def min_over_ranks(value: int, groups: RankGroups) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=groups.messages)
    return int(t.item())


def agree_on_graphs(runner: ModelRunner, captured: bool, groups: RankGroups) -> None:
    """Keep the decode graphs only if every rank captured them: replaying on some ranks while
    others run eagerly would pad the collectives to different sizes."""
    # NOTE: a rank whose capture fails stops warming up; a peer still warming up waits in its
    # next collective for it until the group's timeout, so such a failure is slow to surface.
    if min_over_ranks(int(captured), groups) == 0 and runner.graphs is not None:
        log.warning("another rank could not capture CUDA graphs; decode steps run eagerly")
        runner.graphs = None


class MediaStore:
    """This rank's copy of the embeddings rank 0 sent, kept until the request is dropped."""

    def __init__(self) -> None:
        self.items: dict[str, dict[int, torch.Tensor]] = {}  # request -> item -> [n, H]

    def get(self, request_id: str, index: int) -> torch.Tensor:
        return self.items[request_id][index]

    def drop(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.items.pop(rid, None)

    def add(self, keys: list[tuple[str, int, int]], flat: torch.Tensor) -> None:
        # flat: [sum(rows), H]; the parts are views, freed with the last request using them
        for (rid, index, _), part in zip(keys, flat.split([n for *_, n in keys]), strict=True):
            self.items.setdefault(rid, {})[index] = part


def worker_main(index: int, spec: WorkerSpec) -> None:
    """Entry point of the spawned process of rank ``index + 1``."""
    rank = index + 1
    torch.set_num_threads(spec.num_threads)
    groups = join_group(spec, rank)
    _serve(spec, rank, groups)
    destroy_distributed()  # only after a clean shutdown: on errors the process just ends


def _serve(spec: WorkerSpec, rank: int, groups: RankGroups) -> None:
    load = spec.load
    device = rank_device(load, rank)
    model = load_text_model(load, device)
    media = MediaStore()
    runner = ModelRunner(model, spec.block_size, media.get)
    hidden_size = model.config.text.hidden_size
    dist.barrier(group=groups.messages)  # loaded: rank 0 may start sending
    log.info("rank %d ready on %s", rank, device)
    while True:
        match receive(groups):
            case StepMessage(out=out, media=keys):
                media.drop(out.dropped_request_ids)
                if keys:
                    rows = sum(n for *_, n in keys)
                    flat = torch.empty(rows, hidden_size, dtype=runner.dtype, device=runner.device)
                    dist.broadcast(flat, src=0, group=groups.device)
                    media.add(keys, flat)
                runner.execute(out, sample=False)
            case ProfileMessage() as p:
                n = runner.profile_num_blocks(
                    p.max_num_batched_tokens, p.max_num_seqs, p.mem_fraction_static
                )
                min_over_ranks(n, groups)
            case AllocateMessage(num_blocks=num_blocks):
                runner.allocate_kv_cache(num_blocks)
            case DecodeMessage(settings=settings):
                agree_on_graphs(runner, runner.configure_decode(settings), groups)
            case ShutdownMessage():
                log.info("rank %d shutting down", rank)
                return
