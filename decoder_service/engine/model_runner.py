"""Execute one ``SchedulerOutput`` on the model: a flat varlen batch over the paged KV cache.

Contract: ``ModelRunner`` keeps per-request state created from ``NewRequestData`` and dropped
on ``dropped_request_ids``; ``launch(out)`` packs every scheduled slice back to back (no
padding), computes its 3-D M-RoPE positions (prompt tokens from the request's position table,
later tokens at ``index + rope_delta``), maps tokens to KV slots through the block tables,
writes vision embeddings over the placeholder tokens the slice covers (also when a chunk
boundary cuts an image in two), runs the model, and samples one token for every slice that
reaches its request's last known token; it returns once the work is queued, and the
``PendingStep``'s ``result()`` waits for the tokens (``execute`` is both). A step's host work
is a Python pass over the slices plus a fixed number of numpy ops, staged into one buffer and
moved with one copy (``input_buffers.py``); per-request data (prompt position tables,
block-table rows, the sampler's token lists) is kept across steps, not rebuilt; a decode step
samples straight from the first rows of the hidden states (no gather).
``allocate_kv_cache(num_blocks)`` binds one ``[2, num_blocks + 1, block_size, Hk, D]`` tensor
to every ``Attention`` layer (the extra block is the padding scratch, ``pad_slot``);
``profile_num_blocks`` sizes the pool on a GPU. Embeddings come from
``media_source(request_id, item_index)``, so a worker rank can serve them from its own copy;
a worker runs ``execute(out, sample=False)``.
NOTE: every step queues its work on the one current stream, so a step launched while the host
still handles the previous one's outputs runs after it on the device (KV writes, graph outputs
and staged inputs in order); host buffers are only rewritten once their last copy is done.
``configure_decode(settings)`` (after the cache is bound) fixes the decode kernel's split count
and, on CUDA, captures the decode CUDA graphs (``cuda_graphs.py``): a pure decode step without
media and no larger than the largest graph is then padded into the graph's buffers and replayed;
mixed, larger and media steps run eagerly. Scheduling and stop handling are not here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from decoder_service.engine.cuda_graphs import DecodeGraphs, DecodeSettings, capture_decode_graphs
from decoder_service.engine.input_buffers import BlockTables, StagingBuffer
from decoder_service.engine.request import MediaRef
from decoder_service.engine.sampler import SampledBatch, Sampler, SamplingRow
from decoder_service.engine.sampling_params import SamplingParams
from decoder_service.engine.scheduler import NewRequestData, SchedulerOutput
from kernels.paged_attention import splits_for_context
from models.layers.attention import Attention, AttentionMetadata

log = logging.getLogger(__name__)

MediaSource = Callable[[str, int], torch.Tensor]  # (request id, item index) -> [n, H]


@dataclass
class _RequestState:
    # the sampler's view of the request; its token lists are the runner's own copies, kept
    # current in place (generated tokens are appended as they come back), so no step copies them
    sampling: SamplingRow
    num_prompt_tokens: int
    mm_items: list[MediaRef]
    mm_end: int  # the end of the last placeholder span; slices starting here need no media
    prompt_positions: np.ndarray | None  # [3, num_prompt_tokens] int64; None = 1-D text
    rope_delta: int
    table_row: int  # the request's row in ``ModelRunner.tables``


class TokenLogprobs(NamedTuple):
    logprob: float  # log p(the token the request got) under the model
    top: list[tuple[int, float]]  # most likely tokens, best first


class RunnerOutput(NamedTuple):
    sampled: dict[str, int]  # request id -> sampled token, for slices with ``sample``
    logprobs: dict[str, TokenLogprobs]  # of the sampled token; only for requests that asked
    logprob_rows: dict[str, torch.Tensor]  # [V] float32 log-softmax, for those requests

    def logprobs_of(self, request_id: str, token: int) -> TokenLogprobs | None:
        """Log-probabilities of the token the request actually got: a forced token differs
        from the sampled one, so its entry is read from the row the sampler saw."""
        lp = self.logprobs.get(request_id)
        if lp is None or token == self.sampled.get(request_id):
            return lp
        return TokenLogprobs(float(self.logprob_rows[request_id][token]), lp.top)


class PendingStep(NamedTuple):
    """A launched step: its picks may still be computing on the device."""

    sample_ids: list[str]  # request id per sampled row
    rows: list[SamplingRow]  # what the sampler was given, per row
    picks: SampledBatch | None  # None: nothing sampled (no slice sampled, or a worker rank)

    def result(self) -> RunnerOutput:
        """Wait for the picks and hand them out per request."""
        if self.picks is None:
            return RunnerOutput({}, {}, {})
        result = self.picks.result()
        sampled = dict(zip(self.sample_ids, result.token_ids, strict=True))
        logprobs, logprob_rows = {}, {}
        if result.logprobs is not None:
            for i, rid in enumerate(self.sample_ids):
                if self.rows[i].params.logprobs or self.rows[i].params.top_logprobs:
                    logprobs[rid] = TokenLogprobs(result.logprobs[i], result.top_logprobs[i])
                    logprob_rows[rid] = result.logprob_rows[i]
        return RunnerOutput(sampled, logprobs, logprob_rows)


class StepInputs(NamedTuple):
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [3, T] int64
    meta: AttentionMetadata
    mm_embeds: torch.Tensor | None  # [N_mm, H]
    mm_mask: torch.Tensor | None  # [T] bool
    # [S] int64, rows of the hidden states to sample from; slice(0, S) when they are the first
    # S rows (a decode step): a view instead of a gather
    logits_indices: torch.Tensor | slice
    sample_ids: list[str]  # request id per logits row
    graph_size: int = 0  # > 0: inputs live in the decode graphs' buffers, replay this size


class ModelRunner:
    def __init__(self, model: torch.nn.Module, block_size: int, media_source: MediaSource) -> None:
        self.model = model
        self.block_size = block_size
        self.media_source = media_source
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.sampler = Sampler()
        self.states: dict[str, _RequestState] = {}
        self.attn_layers = [m for m in model.modules() if isinstance(m, Attention)]
        self.num_blocks = 0
        self.pad_slot = 0  # the scratch KV slot padded tokens write to (see allocate_kv_cache)
        self.tables = BlockTables()
        self.staging = StagingBuffer(self.device)
        self.decode_kernel = True  # CUDA pure decode: the Triton paged kernel
        self.decode_splits: int | None = None  # its split count, fixed by configure_decode
        self.graphs: DecodeGraphs | None = None

    # ---- KV cache --------------------------------------------------------------------------

    def bytes_per_block(self) -> int:
        elem = torch.empty(0, dtype=self.dtype).element_size()
        per_token = sum(2 * a.num_kv_heads * a.head_dim for a in self.attn_layers)
        return per_token * self.block_size * elem

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Bind ``num_blocks`` blocks, plus one scratch block past them that no block table
        names: tokens a fixed-size (CUDA-graph) batch pads with write their KV there
        (``pad_slot``), so the cache write needs no mask and no host sync."""
        for layer in self.attn_layers:
            layer.kv_cache = torch.zeros(
                2,
                num_blocks + 1,
                self.block_size,
                layer.num_kv_heads,
                layer.head_dim,
                dtype=self.dtype,
                device=self.device,
            )
        self.num_blocks = num_blocks
        self.pad_slot = num_blocks * self.block_size
        self.graphs = None  # NOTE: captured graphs write the old tensors; capture again

    @torch.inference_mode()
    def profile_num_blocks(
        self, max_num_batched_tokens: int, max_num_seqs: int, mem_fraction_static: float
    ) -> int:
        """GPU: blocks that fit in ``mem_fraction_static`` of the memory left free after the
        weights and the activation peak of a full-budget step."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        n = max_num_batched_tokens
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        pos = torch.arange(n, device=self.device).expand(3, n)
        hidden = self.model(ids, pos, AttentionMetadata.prefill([n], self.device))
        rows = hidden[: min(max_num_seqs, n)]
        logits = self.model.compute_logits(rows)
        self.sampler(logits, [SamplingRow(SamplingParams(temperature=1.0), [], [])] * len(rows))
        del hidden, rows, logits
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        budget = int((free - peak) * mem_fraction_static)
        num_blocks = budget // self.bytes_per_block() - 1  # the scratch block comes on top
        log.info(
            "KV pool: %d blocks (%.2f GiB); activation peak %.2f GiB, free %.2f GiB",
            num_blocks,
            budget / 2**30,
            peak / 2**30,
            free / 2**30,
        )
        return max(num_blocks, 0)

    def configure_decode(self, settings: DecodeSettings) -> bool:
        """Fix how decode steps run and capture their graphs (CUDA only); True when graphs
        serve decode steps. A capture that fails is logged and leaves every step eager."""
        self.decode_kernel = settings.decode_kernel
        self.decode_splits = splits_for_context(settings.max_model_len)
        self.graphs = capture_decode_graphs(self, settings)
        return self.graphs is not None

    # ---- one step --------------------------------------------------------------------------

    def execute(self, out: SchedulerOutput, sample: bool = True) -> RunnerOutput:
        """Run one step; ``sample=False`` (worker ranks) stops after the logits."""
        return self.launch(out, sample).result()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, sample: bool = True) -> PendingStep:
        """Queue one step on the device and return before it finishes; ``result()`` waits."""
        self._update_states(out)
        if out.is_empty:
            return PendingStep([], [], None)
        step = self.prepare_inputs(out)
        greedy = None  # [N] int64 argmax of the logits rows, when the graph computed it
        if step.graph_size:
            # the graph runs the lm_head (and its vocabulary gather under tensor parallelism)
            # and the argmax too: its outputs are static views, padding rows last
            decoded = self.graphs.run(step.graph_size)
            if not step.sample_ids:
                return PendingStep([], [], None)
            logits = decoded.logits[step.logits_indices]
            greedy = decoded.greedy[step.logits_indices]
        else:
            hidden = self.model(
                step.input_ids, step.positions, step.meta, step.mm_embeds, step.mm_mask
            )
            if not step.sample_ids:
                return PendingStep([], [], None)
            # NOTE: with tensor parallelism the lm_head gathers the vocabulary shards, a
            # collective every rank must join even though only rank 0 samples.
            logits = self.model.compute_logits(hidden[step.logits_indices])
        if not sample:
            return PendingStep([], [], None)
        rows = [self.states[rid].sampling for rid in step.sample_ids]
        return PendingStep(step.sample_ids, rows, self.sampler.launch(logits, rows, greedy))

    def _update_states(self, out: SchedulerOutput) -> None:
        for rid in out.dropped_request_ids:
            st = self.states.pop(rid, None)
            if st is not None:
                self.tables.release(st.table_row)
        for new in out.new_requests:
            self.states[new.request_id] = self._new_state(new)

    def _new_state(self, new: NewRequestData) -> _RequestState:
        prompt = list(new.prompt_token_ids)
        output = list(new.output_token_ids)
        table = new.mrope_positions
        return _RequestState(
            sampling=SamplingRow(new.sampling_params, prompt, output),
            num_prompt_tokens=len(prompt),
            mm_items=list(new.mm_items),
            mm_end=max((item.end for item in new.mm_items), default=0),
            prompt_positions=None if table is None else table.to(torch.int64).numpy(),
            rope_delta=new.rope_delta,
            table_row=self.tables.add(),
        )

    def prepare_inputs(self, out: SchedulerOutput) -> StepInputs:
        """The flat batch as device tensors: a Python pass over the slices collects plain ints,
        a fixed number of numpy ops builds every array, one copy moves them to the device."""
        ids: list[int] = []
        starts, lens, rows, prompt_lens, deltas, sample_at, sample_ids = [], [], [], [], [], [], []
        prompt_slices: list[tuple[int, _RequestState, int]] = []  # (slice, state, start)
        media_slices: list[tuple[int, str, _RequestState, int]] = []  # (slice, id, state, start)
        states, sync = self.states, self.tables.sync
        max_blocks = 0
        for i, seq in enumerate(out.sequences):
            st = states[seq.request_id]
            toks, start = seq.token_ids, seq.start
            n = len(toks)
            output = st.sampling.output_token_ids
            known = st.num_prompt_tokens + len(output)
            if start + n > known:  # a token sampled last step, now fed back in
                output += toks[known - start :]
            max_blocks = max(max_blocks, sync(st.table_row, seq.block_ids))
            ids += toks
            starts.append(start)
            lens.append(n)
            rows.append(st.table_row)
            prompt_lens.append(st.num_prompt_tokens)
            deltas.append(st.rope_delta)
            if start < st.num_prompt_tokens and st.prompt_positions is not None:
                prompt_slices.append((i, st, start))
            if start < st.mm_end:
                media_slices.append((i, seq.request_id, st, start))
            if seq.sample:
                sample_at.append(i)
                sample_ids.append(seq.request_id)
        b, t = len(starts), len(ids)
        start_np = np.array(starts, dtype=np.int64)
        row_np = np.array(rows, dtype=np.intp)
        prompt_np = np.array(prompt_lens, dtype=np.int64)
        delta_np = np.array(deltas, dtype=np.int64)
        if t == b:  # one token per slice (pure decode): token i is slice i, no gathers needed
            pos, token_rows = start_np, row_np
            cu = np.arange(b + 1, dtype=np.int64)
            lens_k = start_np + 1
            logits_rows = np.array(sample_at, dtype=np.int64)
        else:
            len_np = np.array(lens, dtype=np.int64)
            cu = np.zeros(b + 1, dtype=np.int64)
            np.cumsum(len_np, out=cu[1:])
            seq_of = np.repeat(np.arange(b), len_np)
            pos = np.arange(t) + np.repeat(start_np - cu[:-1], len_np)
            token_rows, prompt_np, delta_np = row_np[seq_of], prompt_np[seq_of], delta_np[seq_of]
            lens_k = start_np + len_np
            logits_rows = cu[1:][sample_at] - 1  # each sampled slice's last token
        # generated tokens sit at n + rope_delta; prompt tokens at n unless they have a table
        positions = np.empty((3, t), dtype=np.int64)
        positions[:] = np.where(pos >= prompt_np, pos + delta_np, pos)
        for i, st, start in prompt_slices:
            stop = min(start + lens[i], st.num_prompt_tokens)
            positions[:, cu[i] : cu[i] + stop - start] = st.prompt_positions[:, start:stop]
        bs = self.block_size
        block, offset = np.divmod(pos, bs)
        slots = self.tables.ids[token_rows, block].astype(np.int64) * bs + offset
        tables = self.tables.ids[row_np, :max_blocks]
        ids_np = np.array(ids, dtype=np.int64)
        first_rows = slice(0, b) if t == b and len(sample_at) == b else None
        if t == b and self.graphs is not None and not media_slices:
            size = self.graphs.stage(ids_np, positions, slots, logits_rows, lens_k, tables)
            if size is not None:
                v = self.graphs.buffers.batch(size)
                meta = self.graphs.meta(size)
                rows = v.logits_rows[: len(sample_at)] if first_rows is None else first_rows
                return StepInputs(v.ids, v.positions, meta, None, None, rows, sample_ids, size)
        arrays = [
            ids_np,
            positions,
            slots,
            logits_rows,
            cu.astype(np.int32),
            lens_k.astype(np.int32),
            tables,
        ]
        mm_embeds = self._media_rows(media_slices, cu, lens, arrays) if media_slices else None
        staged = self.staging.stage(arrays)
        lens_k_list = lens_k.tolist()
        meta = AttentionMetadata(
            cu_seqlens_q=staged[4],
            seq_lens_k=staged[5],
            max_seqlen_q=max(lens),
            max_seqlen_k=max(lens_k_list),
            slot_mapping=staged[2],
            block_tables=staged[6],
            seq_lens_k_cpu=lens_k_list,
            cu_seqlens_q_cpu=cu.tolist(),
            decode_kernel=self.decode_kernel,
            decode_splits=self.decode_splits,
        )
        return StepInputs(
            input_ids=staged[0],
            positions=staged[1],
            meta=meta,
            mm_embeds=mm_embeds,
            mm_mask=None if mm_embeds is None else staged[7],
            logits_indices=staged[3] if first_rows is None else first_rows,
            sample_ids=sample_ids,
        )

    def _media_rows(
        self,
        media_slices: list[tuple[int, str, _RequestState, int]],
        cu: np.ndarray,  # [B+1] int64
        lens: list[int],
        arrays: list[np.ndarray],
    ) -> torch.Tensor | None:  # [N_mm, H]
        """Embedding rows for the placeholders the slices cover (None: the slices hold text
        only); the [T] bool mask of the batch tokens they replace is appended to ``arrays``."""
        rows: list[torch.Tensor] = []
        mask = np.zeros(int(cu[-1]), dtype=np.bool_)
        for i, rid, st, start in media_slices:
            end, cursor = start + lens[i], int(cu[i])
            for k, item in enumerate(st.mm_items):
                if item.end <= start or item.offset >= end:
                    continue
                embeds = self.media_source(rid, k)  # [item.num_embeds, H]
                row = 0
                for a, b in item.spans:
                    lo, hi = max(a, start), min(b, end)
                    if lo < hi:
                        rows.append(embeds[row + lo - a : row + hi - a])
                        mask[cursor + lo - start : cursor + hi - start] = True
                    row += b - a
        if not rows:
            return None
        arrays.append(mask)
        return torch.cat([r.to(self.device) for r in rows])
