"""CUDA graphs of the decode forward: captured once at start-up, replayed by pure decode steps.

Contract: ``decode_settings(execution, device, max_model_len, max_num_seqs)`` says how decode
steps run (the same on every tensor-parallel rank): whether the Triton paged kernel serves them
and which batch sizes get a graph (``capture_sizes``: 1, 2, 4, 8, 16, 24, 32, then every 16 up
to ``max_num_seqs``; none on CPU, with ``--enforce-eager`` or with SDPA decode attention).
``DecodeGraphs(model, buffers, splits, max_model_len)`` captures, largest first into one shared
memory pool, the whole decode step up to the picks: ``model(ids, positions, meta)`` (embedding,
layers, final norm) reading only the fixed-address ``DecodeBuffers``, then
``model.compute_logits`` (lm_head; under tensor parallelism its vocabulary gather) into a static
float32 logits buffer and the rows' argmax into a static greedy-token buffer.
``padded_size(b, sizes)`` is the graph a batch of ``b`` replays (None: larger than every graph,
run eagerly). A step loads its padded batch into the buffers (``stage``) and ``run(size)``
replays; it returns ``DecodeOutput(logits [size, V], greedy [size])``, views of the static
buffers valid until the next replay (the engine reads a step's picks before it launches the
next). ``capture=False`` runs the same static forward eagerly (tests of the padding on CPU).
What does not belong here: building the step's arrays (``model_runner.py``), sampling other than
the greedy argmax (the sampler, eagerly, from the replayed logits), mixed prefill/decode steps.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from decoder_service.engine.config import ExecutionConfig
from decoder_service.engine.input_buffers import DecodeBuffers
from models.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from decoder_service.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)

_BASE_SIZES = (1, 2, 4, 8, 16, 24, 32)
_STEP = 16  # graph sizes past the base ones
_WARMUP_RUNS = 2  # eager runs per size before its capture


def capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """Batch sizes that get a graph: enough that padding wastes little, few enough to capture
    quickly; ``max_num_seqs`` itself is always one (the scheduler never runs more)."""
    sizes = [s for s in _BASE_SIZES if s < max_num_seqs]
    s = _BASE_SIZES[-1] + _STEP
    while s < max_num_seqs:
        sizes.append(s)
        s += _STEP
    return (*sizes, max(max_num_seqs, 1))


class DecodeOutput(NamedTuple):
    """What a decode graph leaves in its static buffers (views, valid until the next replay)."""

    logits: torch.Tensor  # [size, V] float32, padding rows last
    greedy: torch.Tensor  # [size] int64, each row's argmax


def padded_size(batch: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest captured size holding ``batch`` sequences; None when none does."""
    i = bisect.bisect_left(sizes, batch)
    return sizes[i] if i < len(sizes) else None


@dataclass(frozen=True)
class DecodeSettings:
    """How decode steps run; picklable, sent unchanged to tensor-parallel workers."""

    max_model_len: int  # the longest context: fixes the table width and the kernel's splits
    decode_kernel: bool  # the Triton paged kernel on CUDA (False = SDPA, and no graphs)
    graph_sizes: tuple[int, ...]  # batch sizes to capture, ascending; () = always eager


def decode_settings(
    execution: ExecutionConfig, device: torch.device, max_model_len: int, max_num_seqs: int
) -> DecodeSettings:
    kernel = execution.decode_attention == "auto"
    graphs = device.type == "cuda" and kernel and not execution.enforce_eager
    return DecodeSettings(max_model_len, kernel, capture_sizes(max_num_seqs) if graphs else ())


def capture_decode_graphs(runner: ModelRunner, settings: DecodeSettings) -> DecodeGraphs | None:
    """The runner's decode graphs, captured over its bound KV cache; None when the settings
    ask for none, the device is not CUDA, the decode kernel does not fit the model, or the
    capture failed (logged: the engine then runs every step eagerly)."""
    probe = torch.empty(1, dtype=runner.dtype, device=runner.device)
    fits = all(layer.kernel_fits(probe) for layer in runner.attn_layers)
    if not settings.graph_sizes or runner.device.type != "cuda" or not fits:
        return None
    cols = -(-settings.max_model_len // runner.block_size)  # table width of the longest context
    buffers = DecodeBuffers(
        max(settings.graph_sizes), cols, runner.pad_slot, runner.num_blocks, runner.device
    )
    graphs = DecodeGraphs(runner.model, buffers, runner.decode_splits, settings.max_model_len)
    try:
        graphs.capture(settings.graph_sizes)
    except RuntimeError:
        log.exception("CUDA graph capture failed; decode steps run eagerly")
        return None
    return graphs


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        buffers: DecodeBuffers,
        splits: int,  # the decode kernel's fixed split count
        max_model_len: int,
        capture: bool = True,  # False: ``run`` is the same forward, eager (CPU tests)
    ) -> None:
        self.model, self.buffers, self.capture_graphs = model, buffers, capture
        self.device = buffers.dev.ids.device
        self.sizes: tuple[int, ...] = ()
        self.replays = 0  # steps served by a graph (or by the static forward when not captured)
        # [M+1] int32; the kernel path never reads it, the metadata still describes the batch
        self._cu = torch.arange(buffers.max_seqs + 1, dtype=torch.int32, device=self.device)
        self._splits, self._max_len = splits, max_model_len
        self._meta: dict[int, AttentionMetadata] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # written by every graph, allocated outside the graphs' pool by the first forward
        self._logits: torch.Tensor | None = None  # [max_seqs, V] float32
        self._greedy = torch.empty(buffers.max_seqs, dtype=torch.int64, device=self.device)

    def meta(self, size: int) -> AttentionMetadata:
        """The one metadata object a graph of ``size`` was captured with (fixed tensors)."""
        meta = self._meta.get(size)
        if meta is None:
            v = self.buffers.batch(size)
            meta = AttentionMetadata(
                cu_seqlens_q=self._cu[: size + 1],
                seq_lens_k=v.seq_lens,
                max_seqlen_q=1,
                max_seqlen_k=self._max_len,
                slot_mapping=v.slots,
                block_tables=v.tables,
                decode_kernel=True,
                decode_splits=self._splits,
            )
            self._meta[size] = meta
        return meta

    def _forward(self, size: int) -> DecodeOutput:
        v, meta = self.buffers.batch(size), self.meta(size)
        # the SDPA path caches a gather plan built from the step's values on the metadata;
        # this metadata outlives the step (the kernel path caches nothing)
        meta._decode_plan = meta._decode_rows = None
        hidden = self.model(v.ids, v.positions, meta)  # [size, H]
        if self._logits is None:  # the first (eager) forward learns the vocabulary width
            logits = self.model.compute_logits(hidden)
            self._logits = logits.new_empty(self.buffers.max_seqs, logits.shape[1])
            self._logits[:size].copy_(logits)
        else:
            self.model.compute_logits(hidden, out=self._logits[:size])
        logits, greedy = self._logits[:size], self._greedy[:size]
        torch.argmax(logits, dim=-1, out=greedy)
        return DecodeOutput(logits, greedy)

    @torch.inference_mode()
    def capture(self, sizes: tuple[int, ...]) -> None:
        """Capture every size, largest first; a ``RuntimeError`` leaves no graph behind."""
        sizes = tuple(sorted(s for s in sizes if s <= self.buffers.max_seqs))
        if not self.capture_graphs:
            self.sizes = sizes
            return
        # NOTE: the buffers hold padding only (scratch-block slots, one-key contexts), so the
        # warm-up runs and the capture write no KV a request owns. Warm-up compiles the Triton
        # kernels and runs one-time probes (they synchronise) before any capture; every size
        # shares one memory pool, largest first so the smaller graphs reuse its blocks.
        pool = torch.cuda.graph_pool_handle()
        if self._logits is None:  # allocate the static logits on this stream, outside the pool
            self._forward(sizes[0])
        torch.cuda.synchronize(self.device)
        try:
            for size in reversed(sizes):
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(_WARMUP_RUNS):
                        self._forward(size)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward(size)
                self._graphs[size] = graph
        except RuntimeError:
            self._graphs.clear()
            raise
        finally:
            torch.cuda.synchronize(self.device)
        self.sizes = sizes
        log.info("captured decode CUDA graphs for batch sizes %s", list(sizes))

    def stage(
        self,
        ids: np.ndarray,  # [b] int64
        positions: np.ndarray,  # [3, b] int64
        slots: np.ndarray,  # [b] int64
        logits_rows: np.ndarray,  # [S] int64
        seq_lens: np.ndarray,  # [b] int32
        tables: np.ndarray,  # [b, n] int32
    ) -> int | None:
        """Load a pure decode batch into the buffers; its graph size, or None (run eagerly)."""
        size = padded_size(len(ids), self.sizes)
        if size is None or tables.shape[1] > self.buffers.max_blocks:
            return None
        self.buffers.load(size, ids, positions, slots, logits_rows, seq_lens, tables)
        return size

    def run(self, size: int) -> DecodeOutput:
        self.replays += 1
        graph = self._graphs.get(size)
        if graph is None:  # not captured (CPU tests): the same forward, eagerly
            return self._forward(size)
        graph.replay()
        return DecodeOutput(self._logits[:size], self._greedy[:size])
