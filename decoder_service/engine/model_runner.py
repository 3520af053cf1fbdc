"""Execute one ``SchedulerOutput`` on the model: a flat varlen batch over the paged KV cache.

Contract: ``ModelRunner`` keeps per-request state created from ``NewRequestData`` and dropped
on ``dropped_request_ids``; ``execute(out)`` packs every scheduled slice back to back (no
padding), computes its 3-D M-RoPE positions (prompt tokens from the request's position table,
later tokens at ``index + rope_delta``), maps tokens to KV slots through the block tables,
writes vision embeddings over the placeholder tokens the slice covers (also when a chunk
boundary cuts an image in two), runs the model, and samples one token for every slice that
reaches its request's last known token. ``allocate_kv_cache(num_blocks)`` binds one
``[2, num_blocks, block_size, Hk, D]`` tensor to every ``Attention`` layer; ``profile_num_blocks``
sizes the pool on a GPU. Embeddings come from ``media_source(request_id, item_index)``, so a
worker rank can serve them from its own copy; a worker runs ``execute(out, sample=False)``.
Scheduling and stop handling are not here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from decoder_service.engine.request import MediaRef
from decoder_service.engine.sampler import Sampler, SamplingRow
from decoder_service.engine.sampling_params import SamplingParams
from decoder_service.engine.scheduler import NewRequestData, SchedulerOutput
from models.layers.attention import Attention, AttentionMetadata

log = logging.getLogger(__name__)

MediaSource = Callable[[str, int], torch.Tensor]  # (request id, item index) -> [n, H]


@dataclass
class _RequestState:
    params: SamplingParams
    token_ids: list[int]  # prompt + generated tokens the runner has seen
    num_prompt_tokens: int
    mm_items: list[MediaRef]
    mrope_positions: torch.Tensor | None  # [3, num_prompt_tokens] int64 CPU
    rope_delta: int


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


class StepInputs(NamedTuple):
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [3, T] int64
    meta: AttentionMetadata
    mm_embeds: torch.Tensor | None  # [N_mm, H]
    mm_mask: torch.Tensor | None  # [T] bool
    logits_indices: torch.Tensor  # [S] int64, rows of the hidden states to sample from
    sample_ids: list[str]  # request id per logits row


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

    # ---- KV cache --------------------------------------------------------------------------

    def bytes_per_block(self) -> int:
        elem = torch.empty(0, dtype=self.dtype).element_size()
        per_token = sum(2 * a.num_kv_heads * a.head_dim for a in self.attn_layers)
        return per_token * self.block_size * elem

    def allocate_kv_cache(self, num_blocks: int) -> None:
        for layer in self.attn_layers:
            layer.kv_cache = torch.zeros(
                2,
                num_blocks,
                self.block_size,
                layer.num_kv_heads,
                layer.head_dim,
                dtype=self.dtype,
                device=self.device,
            )
        self.num_blocks = num_blocks

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
        num_blocks = budget // self.bytes_per_block()
        log.info(
            "KV pool: %d blocks (%.2f GiB); activation peak %.2f GiB, free %.2f GiB",
            num_blocks,
            budget / 2**30,
            peak / 2**30,
            free / 2**30,
        )
        return max(num_blocks, 0)

    # ---- one step --------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, sample: bool = True) -> RunnerOutput:
        """Run one step; ``sample=False`` (worker ranks) stops after the logits."""
        self._update_states(out)
        if out.is_empty:
            return RunnerOutput({}, {}, {})
        step = self.prepare_inputs(out)
        hidden = self.model(step.input_ids, step.positions, step.meta, step.mm_embeds, step.mm_mask)
        if not step.sample_ids:
            return RunnerOutput({}, {}, {})
        # NOTE: with tensor parallelism the lm_head gathers the vocabulary shards, a collective
        # every rank must join even though only rank 0 samples.
        logits = self.model.compute_logits(hidden[step.logits_indices])
        if not sample:
            return RunnerOutput({}, {}, {})
        rows = [self._sampling_row(self.states[rid]) for rid in step.sample_ids]
        result = self.sampler(logits, rows)
        sampled = dict(zip(step.sample_ids, result.token_ids, strict=True))
        logprobs, logprob_rows = {}, {}
        if result.logprobs is not None:
            for i, rid in enumerate(step.sample_ids):
                if rows[i].params.logprobs or rows[i].params.top_logprobs:
                    logprobs[rid] = TokenLogprobs(result.logprobs[i], result.top_logprobs[i])
                    logprob_rows[rid] = result.logprob_rows[i]
        return RunnerOutput(sampled, logprobs, logprob_rows)

    def _update_states(self, out: SchedulerOutput) -> None:
        for rid in out.dropped_request_ids:
            self.states.pop(rid, None)
        for new in out.new_requests:
            self.states[new.request_id] = self._new_state(new)

    @staticmethod
    def _new_state(new: NewRequestData) -> _RequestState:
        return _RequestState(
            params=new.sampling_params,
            token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
            num_prompt_tokens=len(new.prompt_token_ids),
            mm_items=list(new.mm_items),
            mrope_positions=new.mrope_positions,
            rope_delta=new.rope_delta,
        )

    @staticmethod
    def _sampling_row(st: _RequestState) -> SamplingRow:
        return SamplingRow(
            st.params, st.token_ids[: st.num_prompt_tokens], st.token_ids[st.num_prompt_tokens :]
        )

    def prepare_inputs(self, out: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        mm_rows: list[torch.Tensor] = []
        mm_at: list[torch.Tensor] = []
        cu, lens_k, logits_idx, sample_ids = [0], [], [], []
        max_blocks = max(len(s.block_ids) for s in out.sequences)
        tables = torch.zeros(len(out.sequences), max_blocks, dtype=torch.int32)
        for i, seq in enumerate(out.sequences):
            st = self.states[seq.request_id]
            n = len(seq.token_ids)
            start, end, cursor = seq.start, seq.start + n, cu[-1]
            if end > len(st.token_ids):  # a token sampled last step, now fed back in
                st.token_ids.extend(seq.token_ids[len(st.token_ids) - start :])
            ids.extend(seq.token_ids)
            positions.append(self._positions(st, start, end))
            table = torch.tensor(seq.block_ids, dtype=torch.int64)
            tables[i, : len(seq.block_ids)] = table.to(torch.int32)
            idx = torch.arange(start, end)
            slots.append(table[idx // bs] * bs + idx % bs)
            self._media_rows(seq.request_id, st, start, end, cursor, mm_rows, mm_at)
            cu.append(cursor + n)
            lens_k.append(end)
            if seq.sample:
                logits_idx.append(cursor + n - 1)
                sample_ids.append(seq.request_id)
        dev = self.device
        meta = AttentionMetadata(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            seq_lens_k=torch.tensor(lens_k, dtype=torch.int32, device=dev),
            max_seqlen_q=max(b - a for a, b in zip(cu, cu[1:], strict=False)),
            max_seqlen_k=max(lens_k),
            slot_mapping=torch.cat(slots).to(dev),
            block_tables=tables.to(dev),
            seq_lens_k_cpu=lens_k,
            cu_seqlens_q_cpu=cu,
        )
        mm_embeds = mm_mask = None
        if mm_rows:
            mm_embeds = torch.cat([r.to(dev) for r in mm_rows])
            mm_mask = torch.zeros(len(ids), dtype=torch.bool)
            mm_mask[torch.cat(mm_at)] = True
            mm_mask = mm_mask.to(dev)
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
            positions=torch.cat(positions, dim=1).to(dev),
            meta=meta,
            mm_embeds=mm_embeds,
            mm_mask=mm_mask,
            logits_indices=torch.tensor(logits_idx, dtype=torch.long, device=dev),
            sample_ids=sample_ids,
        )

    @staticmethod
    def _positions(st: _RequestState, start: int, end: int) -> torch.Tensor:  # [3, end-start]
        p = st.num_prompt_tokens
        parts = []
        if start < p:
            stop = min(end, p)
            if st.mrope_positions is not None:
                parts.append(st.mrope_positions[:, start:stop])
            else:
                parts.append(torch.arange(start, stop).expand(3, -1))
        if end > p:
            parts.append((torch.arange(max(start, p), end) + st.rope_delta).expand(3, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _media_rows(
        self,
        rid: str,
        st: _RequestState,
        start: int,
        end: int,
        cursor: int,
        rows_out: list[torch.Tensor],
        at_out: list[torch.Tensor],
    ) -> None:
        """Embedding rows for the placeholders in [start, end), and their batch positions."""
        for k, item in enumerate(st.mm_items):
            if item.end <= start or item.offset >= end:
                continue
            embeds = self.media_source(rid, k)  # [item.num_embeds, H]
            row = 0
            for a, b in item.spans:
                lo, hi = max(a, start), min(b, end)
                if lo < hi:
                    rows_out.append(embeds[row + lo - a : row + hi - a])
                    at_out.append(torch.arange(cursor + lo - start, cursor + hi - start))
                row += b - a
