"""Packs concurrent encode jobs into one varlen vision-tower forward.

Contract: ``await VisionBatcher.encode(pixel_values, grid_thw)`` returns that item's embeddings
``[t*h*w/merge**2, out_hidden]``. Jobs queue up while a forward runs; the next forward takes every
queued job, in arrival order, up to ``max_batch_patches`` patches (a single job larger than the
budget runs alone). The tower receives one flat batch with one ``grid_thw`` row per item and
splits it into per-image / per-frame-group attention segments itself. Forwards run one at a time
on a dedicated thread so the event loop keeps accepting requests. A job whose caller gave up
(deadline, cancellation) before its forward started is dropped.
Decoding media and caching do not belong here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

# (pixel_values [N, patch_dim] float32, grid_thw [M, 3] int64) -> [N / merge**2, out_hidden]
EncodeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class _Job:
    pixel_values: torch.Tensor  # [n, patch_dim] float32
    grid_thw: tuple[int, int, int]
    future: asyncio.Future[torch.Tensor]

    @property
    def patches(self) -> int:
        return int(self.pixel_values.shape[0])


@dataclass(frozen=True)
class BatchStats:
    """What one forward did, for metrics."""

    items: int
    patches: int
    seconds: float


class VisionBatcher:
    def __init__(
        self,
        encode_fn: EncodeFn,
        max_batch_patches: int,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self._encode_fn = encode_fn
        self._max_patches = max_batch_patches
        self._on_batch = on_batch
        self._queue: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        # NOTE: one thread: forwards must not overlap (device memory, intra-op thread pools).
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vit")
        self.forwards = 0  # number of tower forwards run so far

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for a forward (not counting the one running)."""
        return len(self._queue)

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="vit-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        for job in self._queue:
            if not job.future.done():
                job.future.cancel()
        self._queue.clear()
        self._executor.shutdown(wait=True)

    async def encode(
        self,
        pixel_values: torch.Tensor,  # [n, patch_dim] float32
        grid_thw: tuple[int, int, int],
    ) -> torch.Tensor:  # [n / merge**2, out_hidden]
        if self._worker is None:
            raise RuntimeError("VisionBatcher.start() was not called")
        future: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(pixel_values, grid_thw, future))
        self._wakeup.set()
        return await future

    def _take_batch(self) -> list[_Job]:
        batch: list[_Job] = []
        patches = 0
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # cancelled by its caller while waiting
                self._queue.popleft()
                continue
            if batch and patches + job.patches > self._max_patches:
                break
            batch.append(self._queue.popleft())
            patches += job.patches
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while batch := self._take_batch():
                try:
                    outputs = await loop.run_in_executor(self._executor, self._forward, batch)
                except (
                    Exception
                ) as exc:  # a failed forward (e.g. OOM) fails its jobs, not the worker
                    for job in batch:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                for job, out in zip(batch, outputs, strict=True):
                    if not job.future.done():
                        job.future.set_result(out)

    def _forward(self, batch: list[_Job]) -> list[torch.Tensor]:
        start = time.monotonic()
        pixel_values = torch.cat([job.pixel_values for job in batch])  # [N, patch_dim]
        grid_thw = torch.tensor([job.grid_thw for job in batch], dtype=torch.int64)  # [M, 3]
        with torch.inference_mode():
            out = self._encode_fn(pixel_values, grid_thw)  # [N / merge**2, out_hidden]
        total = pixel_values.shape[0]
        per_token = total // out.shape[0]  # merge**2 patches per output row
        sizes = [job.patches // per_token for job in batch]
        # clone: a cached item must not pin the storage of the whole batch
        pieces = [piece.clone() for piece in torch.split(out, sizes)]
        self.forwards += 1
        if self._on_batch is not None:
            self._on_batch(BatchStats(len(batch), int(total), time.monotonic() - start))
        return pieces
