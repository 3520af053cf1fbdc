"""Turn a batch of next-token logits into tokens, one row per sampled request.

Contract: ``Sampler.__call__(logits [N, V] float32, batch)`` returns a ``SamplerOutput`` with one
token per row. Order of operations: penalties (repetition over prompt + output, presence and
frequency over the output), then greedy rows take the argmax; the rest apply temperature,
top-k, top-p, min-p and draw with the exponential-race trick (argmax of p / Exp(1) is a draw
from p). A seeded row draws its noise from a generator seeded by (seed, number of tokens already
generated), so its tokens do not depend on batch composition, preemption or other requests.
Log-probabilities are of the model's own distribution (before penalties and temperature); the
whole log-softmax rows come back too, so a token chosen after sampling (a forced one) gets its
log-probability from the same logits. ``launch`` queues the same work and returns the picks as
device tensors (``SampledBatch``) whose ``result()`` waits for them, so the host can do other
work while the device finishes the step.
Stop handling is not here (scheduler and detokenizer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from decoder_service.engine.sampling_params import SamplingParams

_SEED_STRIDE = 1_000_003  # mixes the step index into the seed; any odd constant would do


@dataclass
class SamplingRow:
    """What the sampler needs about one request."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]


class SamplerOutput(NamedTuple):
    token_ids: list[int]  # one per row
    logprobs: list[float] | None  # log p(chosen token), per row; None if no row asked
    top_logprobs: list[list[tuple[int, float]]] | None  # per row: (token, logprob), best first
    logprob_rows: torch.Tensor | None = None  # [N, V] float32 log-softmax; None if no row asked


class SampledBatch(NamedTuple):
    """A batch's picks as device tensors, queued but not yet waited for (``result()`` waits)."""

    tokens: torch.Tensor  # [N] int64
    logprob_rows: torch.Tensor | None  # [N, V] float32 log-softmax; None if no row asked
    chosen: torch.Tensor | None  # [N] float32, log p of each pick; None if no row asked
    top: tuple[torch.Tensor, torch.Tensor] | None  # [N, k] float32 values, [N, k] int64 ids
    top_counts: list[int]  # top log-probabilities each row asked for (with logprob_rows)

    def result(self) -> SamplerOutput:
        # NOTE: the first .tolist() waits until the device has finished the step
        token_list = self.tokens.tolist()
        if self.logprob_rows is None:
            return SamplerOutput(token_list, None, None, None)
        top: list[list[tuple[int, float]]] = [[] for _ in self.top_counts]
        if self.top is not None:
            values, ids = self.top[0].tolist(), self.top[1].tolist()
            for i, n in enumerate(self.top_counts):
                top[i] = list(zip(ids[i][:n], values[i][:n], strict=True))
        return SamplerOutput(token_list, self.chosen.tolist(), top, self.logprob_rows)


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        # logits: [N, V] float32
        return self.launch(logits, rows).result()

    def launch(
        self,
        logits: torch.Tensor,  # [N, V] float32
        rows: list[SamplingRow],
        greedy: torch.Tensor | None = None,  # [N] int64 argmax of ``logits``, computed already
    ) -> SampledBatch:
        """Queue the picks on the logits' device. Greedy rows without penalties only queue device
        work (none at all when ``greedy`` is given); random rows and penalties copy small host
        tensors over, which waits for it. ``greedy`` may be a buffer the caller reuses: it is
        read, never written."""
        raw_logprobs = None
        if any(r.params.logprobs or r.params.top_logprobs for r in rows):
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)
        penalised = apply_penalties(logits.float(), rows)
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if greedy is not None and penalised is logits and not random_rows:
            tokens = greedy
        else:
            tokens = penalised.argmax(dim=-1)
        logits = penalised
        if random_rows:
            idx = torch.tensor(random_rows, device=logits.device)
            drawn = _sample_rows(logits[idx], [rows[i] for i in random_rows])
            tokens[idx] = drawn
        if raw_logprobs is None:
            return SampledBatch(tokens, None, None, None, [])
        chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
        counts = [r.params.top_logprobs for r in rows]
        k = max(counts)
        top = tuple(raw_logprobs.topk(k, dim=-1)) if k else None
        return SampledBatch(tokens, raw_logprobs, chosen, top, counts)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition, presence and frequency penalties; returns a new tensor when any applies."""
    need = [
        i
        for i, r in enumerate(rows)
        if r.params.repetition_penalty != 1.0
        or r.params.presence_penalty != 0.0
        or r.params.frequency_penalty != 0.0
    ]
    if not need:
        return logits
    logits = logits.clone()
    vocab = logits.shape[-1]
    device = logits.device
    for i in need:
        p = rows[i].params
        row = logits[i]
        out_ids = torch.tensor(rows[i].output_token_ids, dtype=torch.long, device=device)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(
                rows[i].prompt_token_ids + rows[i].output_token_ids, dtype=torch.long, device=device
            ).unique()
            vals = row[seen]
            row[seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if out_ids.numel() and (p.presence_penalty or p.frequency_penalty):
            counts = torch.zeros(vocab, dtype=logits.dtype, device=device)
            counts.scatter_add_(0, out_ids, torch.ones_like(out_ids, dtype=logits.dtype))
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


def _sample_rows(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    # logits: [n, V] float32 -> [n] int64
    device = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], device=device)
    logits = logits / temps[:, None]
    top_k = [r.params.top_k for r in rows]
    if any(k > 0 for k in top_k):
        vocab = logits.shape[-1]
        k = torch.tensor([k if k > 0 else vocab for k in top_k], device=device).clamp(max=vocab)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([r.params.top_p for r in rows], device=device)
    if (top_p < 1.0).any():
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass strictly before it already reaches top_p
        drop_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    min_p = torch.tensor([r.params.min_p for r in rows], device=device)
    if (min_p > 0).any():
        floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < floor, 0.0)
    noise = torch.empty_like(probs).exponential_()
    for i, r in enumerate(rows):
        if r.params.seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed((r.params.seed + _SEED_STRIDE * len(r.output_token_ids)) % 2**63)
            noise[i].exponential_(generator=gen)
    return (probs / noise).argmax(dim=-1)
