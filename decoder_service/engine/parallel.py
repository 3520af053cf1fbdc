"""Rank 0 of a tensor/expert-parallel engine: spawn the worker ranks and mirror each step on them.

Contract: ``start_workers(load, parallel, block_size)`` spawns ranks 1..tp-1 (torch
multiprocessing; rendezvous through MASTER_ADDR/MASTER_PORT = 127.0.0.1 and a free port), joins
this process to the group as rank 0 and returns a ``WorkerGroup``. The caller then loads rank 0's
shard (``load_model`` after this call: the parallel layers read the group when built) and passes
the group to ``LLMEngine(..., workers=group)``, which wraps its ``ModelRunner`` in a
``ParallelExecutor``: the same ``launch`` / ``allocate_kv_cache`` / ``profile_num_blocks``, each
first broadcast to the workers (``workers.py`` has the messages). Media embeddings go to the
workers once per request, the first time a scheduled slice covers them (again after a
preemption, which drops the request on every rank). Rank 0 decides the KV pool size (on GPU the
minimum any rank can hold) and every rank allocates its kv-head shard of it.
Failure: a worker that dies or raises makes the next (or current) call on rank 0 raise
``ParallelWorkerError`` carrying the worker's own error; the group is then unusable. ``close()``
sends a shutdown message when the group is healthy, joins with a timeout, terminates what is left
and leaves the process group. ``load_parallel_engine`` is all of this for a text-only engine.
Not here: what a worker does (``workers.py``), scheduling, the model's collectives.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

from decoder_service.engine.config import EngineConfig, LoadConfig, ParallelConfig
from decoder_service.engine.model_runner import ModelRunner, PendingStep, RunnerOutput
from decoder_service.engine.request import MediaRef
from decoder_service.engine.scheduler import SchedulerOutput
from decoder_service.engine.workers import (
    AllocateMessage,
    Message,
    ProfileMessage,
    RankGroups,
    ShutdownMessage,
    StepMessage,
    WorkerSpec,
    join_group,
    load_text_model,
    min_over_ranks,
    rank_device,
    worker_main,
)
from models.distributed import destroy_distributed
from models.glm4v.config import ModelConfig

if TYPE_CHECKING:
    from decoder_service.engine.engine import LLMEngine

log = logging.getLogger(__name__)

_POLL_S = 0.01  # liveness checks while waiting for the workers to load
_EXIT_GRACE_S = 2.0  # after a failed collective: time for a failing worker to finish exiting
_JOIN_TIMEOUT_S = 30.0  # close(): time the workers get to leave before they are terminated


class ParallelWorkerError(RuntimeError):
    """A worker rank died or failed, or the group broke earlier; close the engine."""


class WorkerGroup:
    """Rank 0's handle on the spawned ranks: their processes and the two process groups."""

    def __init__(self, context: mp.ProcessContext, groups: RankGroups, spec: WorkerSpec) -> None:
        self.context = context
        self.groups = groups
        self.spec = spec
        self.broken: str | None = None  # why the group can no longer run steps
        self.closed = False

    @property
    def processes(self) -> list[Any]:  # multiprocessing.Process of ranks 1..tp-1
        return list(self.context.processes)

    def wait_ready(self) -> None:
        """Block until every worker has loaded its shard; raise if one dies meanwhile."""
        with self.guard():
            work = dist.barrier(group=self.groups.messages, async_op=True)
            while not work.is_completed():
                self.check_alive()
                time.sleep(_POLL_S)
            work.wait()

    def check_alive(self) -> None:
        if self.broken is not None:
            raise ParallelWorkerError(f"tensor-parallel group unusable: {self.broken}")
        error = self._failure(grace_s=0.0)
        if error is not None:
            raise error

    def send(self, msg: Message) -> None:
        self.check_alive()
        dist.broadcast_object_list([msg], src=0, group=self.groups.messages)

    def broadcast(self, tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, src=0, group=self.groups.device)

    def min_over_ranks(self, value: int) -> int:
        return min_over_ranks(value, self.groups)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Turn a failed collective into ``ParallelWorkerError`` when a worker is behind it; any
        failure leaves the ranks out of step, so the group is marked broken either way."""
        try:
            yield
        except ParallelWorkerError as exc:
            self.broken = self.broken or str(exc)
            raise
        except RuntimeError as exc:  # collectives fail with RuntimeError when a peer is gone
            self.broken = self.broken or f"{type(exc).__name__}: {exc}"
            error = self._failure(grace_s=_EXIT_GRACE_S)
            if error is not None:
                raise error from exc
            raise
        except BaseException as exc:
            # NOTE: a call half done on some ranks cannot be lined up again; re-raised as is
            self.broken = self.broken or f"{type(exc).__name__}: {exc}"
            raise

    def _failure(self, grace_s: float) -> ParallelWorkerError | None:
        procs = self.processes
        if grace_s > 0:
            wait([p.sentinel for p in procs], timeout=grace_s)
        dead = [(rank, p.exitcode) for rank, p in enumerate(procs, 1) if not p.is_alive()]
        if not dead:
            return None
        detail = ", ".join(f"rank {r} exited with code {c}" for r, c in dead)
        try:
            # re-raises a worker's exception with its traceback (and stops the other workers)
            self.context.join(timeout=0)
        except ProcessRaisedException as exc:
            detail = f"{detail}: {exc}"
        except ProcessExitedException:
            pass  # killed by a signal: the exit code above says which
        self.broken = detail
        return ParallelWorkerError(f"tensor-parallel worker failed: {detail}")

    def close(self, timeout_s: float = _JOIN_TIMEOUT_S) -> None:
        """Stop the workers (politely when the group is healthy) and leave the process group."""
        if self.closed:
            return
        self.closed = True
        procs = self.processes
        if self.broken is None and all(p.is_alive() for p in procs):
            try:
                self.send(ShutdownMessage())
            except RuntimeError as exc:  # a worker died just now; it is reaped below
                log.warning("shutdown message not delivered: %s", exc)
            wait([p.sentinel for p in procs], timeout=timeout_s)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        destroy_distributed()


class ParallelExecutor:
    """Rank 0's executor: the ``ModelRunner`` calls, each mirrored on the worker ranks."""

    def __init__(self, runner: ModelRunner, workers: WorkerGroup) -> None:
        if workers.spec.block_size != runner.block_size:
            raise ValueError("the workers were started with another KV block size")
        self.runner = runner
        self.workers = workers
        self.device, self.dtype = runner.device, runner.dtype
        self._media: dict[str, list[MediaRef]] = {}  # media of the requests the runners hold
        self._sent: dict[str, set[int]] = {}  # item indices the workers hold, per request
        workers.wait_ready()

    def launch(self, out: SchedulerOutput) -> GuardedStep:
        keys, rows = self._media_to_send(out)
        with self.workers.guard():
            if out.sequences or out.dropped_request_ids:  # idle steps stay on rank 0
                self.workers.send(StepMessage(out, keys))
                if rows:
                    self.workers.broadcast(torch.cat(rows))
            return GuardedStep(self.runner.launch(out), self.workers)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        with self.workers.guard():
            self.workers.send(AllocateMessage(num_blocks))
            self.runner.allocate_kv_cache(num_blocks)

    def profile_num_blocks(
        self, max_num_batched_tokens: int, max_num_seqs: int, mem_fraction_static: float
    ) -> int:
        """The pool every rank can hold: each profiles its own shard, rank 0 takes the least."""
        with self.workers.guard():
            self.workers.send(
                ProfileMessage(max_num_batched_tokens, max_num_seqs, mem_fraction_static)
            )
            n = self.runner.profile_num_blocks(
                max_num_batched_tokens, max_num_seqs, mem_fraction_static
            )
            return self.workers.min_over_ranks(n)

    def close(self) -> None:
        self.workers.close()

    def _media_to_send(
        self, out: SchedulerOutput
    ) -> tuple[list[tuple[str, int, int]], list[torch.Tensor]]:
        """Embeddings the workers lack for this step's slices, as message keys and [n, H] rows.

        Follows the runner's order: drops first, then new requests (an id may be reused)."""
        for rid in out.dropped_request_ids:
            self._media.pop(rid, None)
            self._sent.pop(rid, None)
        for new in out.new_requests:
            self._media[new.request_id] = list(new.mm_items)
            self._sent[new.request_id] = set()
        keys: list[tuple[str, int, int]] = []
        rows: list[torch.Tensor] = []
        for seq in out.sequences:
            start, end = seq.start, seq.start + len(seq.token_ids)
            sent = self._sent[seq.request_id]
            for k, ref in enumerate(self._media[seq.request_id]):
                if k in sent or ref.end <= start or ref.offset >= end:
                    continue
                embeds = self.runner.media_source(seq.request_id, k)  # [n, H]
                keys.append((seq.request_id, k, embeds.shape[0]))
                rows.append(embeds.to(self.runner.device))  # host-parked features too
                sent.add(k)
        return keys, rows


class GuardedStep(NamedTuple):
    """Rank 0's launched step; waiting for it may surface a worker's failure, so it is guarded."""

    step: PendingStep
    workers: WorkerGroup

    def result(self) -> RunnerOutput:
        with self.workers.guard():
            return self.step.result()


def start_workers(load: LoadConfig, parallel: ParallelConfig, block_size: int) -> WorkerGroup:
    """Spawn ranks 1..tp-1 and join this process to their group as rank 0."""
    if parallel.tp < 2:
        raise ValueError("start_workers needs tp >= 2")
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group")
    device = rank_device(load, 0)
    if device.type == "cuda" and torch.cuda.device_count() < parallel.tp:
        raise ValueError(
            f"--tp {parallel.tp} needs {parallel.tp} GPUs, {torch.cuda.device_count()} visible"
        )
    # the spawned processes inherit the environment: env:// rendezvous on a free local port
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    spec = WorkerSpec(load, parallel, block_size, torch.get_num_threads())
    # daemon: if this process dies without close(), its workers go with it
    context = mp.spawn(worker_main, args=(spec,), nprocs=parallel.tp - 1, join=False, daemon=True)
    try:
        groups = join_group(spec, 0)
    except BaseException:
        for p in context.processes:
            p.kill()
        raise
    return WorkerGroup(context, groups, spec)


def load_parallel_engine(
    config: EngineConfig, model_config: ModelConfig, tokenizer: Any | None = None
) -> LLMEngine:
    """The text-only engine over ``config.parallel.tp`` ranks; ``engine.close()`` stops them."""
    from decoder_service.engine.engine import LLMEngine  # the engine imports this module

    load = config.load
    workers = start_workers(load, config.parallel, config.cache.block_size)
    try:
        device = rank_device(load, 0)
        model = load_text_model(load, device)
        return LLMEngine(model, model_config, config, tokenizer, workers=workers)
    except BaseException:
        workers.close()
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
