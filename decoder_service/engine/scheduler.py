"""The scheduler: which requests compute which tokens this step, under a token budget.

Contract: ``schedule()`` returns a ``SchedulerOutput``, a plain picklable description of one
step (token ids, positions in the sequence, block tables, requests to add and drop) that any
worker rank holding the same weights can execute. Policy: requests already running go first,
decodes before unfinished prefills, then waiting requests in arrival order (a request still
waiting for media embeddings is passed over, not blocking the queue). Prefills are cut into
chunks of at most ``chunked_prefill_size`` tokens. When the KV pool runs out, the most recently
admitted running request is preempted: its blocks are freed and it is recomputed later.
``update_from_output`` advances each request by what was computed and appends sampled tokens
(or the token the request's forcing policy puts in a sampled token's place, see request.py),
ending requests on EOS, stop token ids, ``max_tokens`` or ``max_model_len``. Stop strings are
the detokenizer's; the engine ends those through ``finish_request``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from decoder_service.engine.config import SchedulerConfig
from decoder_service.engine.kv_cache_manager import CachedPrefix, KVCacheManager
from decoder_service.engine.request import MediaRef, Request, RequestStatus
from decoder_service.engine.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """Sent once when a request (re)joins the batch; the runner keeps it until it is dropped."""

    request_id: str
    prompt_token_ids: list[int]  # the whole prompt
    output_token_ids: list[int]  # tokens generated before a preemption; empty when new
    mm_items: list[MediaRef]  # media in the prompt (embeddings travel separately, by index)
    mrope_positions: torch.Tensor | None  # [3, num_prompt_tokens] int64 CPU; None = 1-D text
    rope_delta: int  # token n >= prompt length sits at position n + rope_delta
    sampling_params: SamplingParams  # how to pick its next tokens


@dataclass
class ScheduledSequence:
    """The slice of one request computed this step."""

    request_id: str
    token_ids: list[int]  # tokens to run through the model, in order
    start: int  # tokens already in the KV cache = sequence index of token_ids[0]
    # the request's whole block table after this step's allocation; shared, do not mutate
    block_ids: list[int]
    sample: bool  # the slice ends at the last known token: sample one token from its logits


@dataclass
class SchedulerOutput:
    """One step of work for the model runner (and, with tensor parallelism, every rank)."""

    new_requests: list[NewRequestData] = field(default_factory=list)  # runner state to create
    sequences: list[ScheduledSequence] = field(default_factory=list)  # decodes, then prefills
    dropped_request_ids: list[str] = field(default_factory=list)  # finished/preempted: forget
    num_batched_tokens: int = 0  # total tokens in ``sequences``
    num_preempted: int = 0  # requests preempted while building this step

    @property
    def is_empty(self) -> bool:
        return not self.sequences

    def describe(self) -> str:
        """One line for logs: what the step computes."""
        seqs = self.sequences
        decodes = sum(1 for s in seqs if len(s.token_ids) == 1)
        chunks = sum(1 for s in seqs if len(s.token_ids) > 1 and s.start > 0)
        longest = max((s.start + len(s.token_ids) for s in seqs), default=0)
        return (
            f"{len(seqs)} sequences, {self.num_batched_tokens} tokens: {decodes} one-token, "
            f"{chunks} continuing a cached prefix, {len(self.new_requests)} new; "
            f"longest context {longest}"
        )


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the tail is preempted first
        self._dropped: list[str] = []  # runner state to drop at the next step
        self.num_preemptions = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_request(self, request: Request, status: RequestStatus, reason=None) -> None:
        """End a request (stop, length or abort) and release its blocks."""
        if request.finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
            self._dropped.append(request.request_id)
        else:
            self.waiting.remove(request)
        self.kv.free(request)
        request.status = status
        request.stop_reason = reason
        self.requests.pop(request.request_id, None)

    # ---- schedule -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(dropped_request_ids=self._dropped)
        self._dropped = []
        budget = self.config.max_num_batched_tokens
        scheduled: set[str] = set()  # ids given a slice: never chosen as preemption victims
        # decodes (one token left) first, then unfinished prefills, each in admission order
        decodes, prefills = [], []
        for req in self.running:
            remaining = req.num_tokens - req.num_computed_tokens
            if remaining == 1:
                decodes.append(req)
            elif remaining > 1:
                prefills.append(req)
        for req in decodes + prefills:
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            n = self._num_new_tokens(req, req.num_computed_tokens, budget)
            if n <= 0:
                continue
            if self._allocate_or_preempt(req, n, scheduled, out):
                out.sequences.append(self._slice(req, n))
                scheduled.add(req.request_id)
                budget -= n
        if not out.num_preempted:  # blocks just taken from someone are not handed to newcomers
            budget = self._admit_waiting(budget, out)
        out.num_batched_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _num_new_tokens(self, req: Request, start: int, budget: int) -> int:
        remaining = req.num_tokens - start
        n = min(remaining, budget)
        if remaining > 1:
            n = min(n, self.config.prefill_chunk)
        if not req.mm_items:  # text only: nothing can hold the prefill back
            return n
        return min(n, req.computable_until(start) - start)

    def _allocate_or_preempt(
        self, req: Request, n: int, scheduled: set[str], out: SchedulerOutput
    ) -> bool:
        while not self.kv.allocate(req, n):
            victim = next(
                (
                    r
                    for r in reversed(self.running)
                    if r is not req and r.request_id not in scheduled
                ),
                req,
            )
            self._preempt(victim, out)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.waiting.appendleft(req)  # victims are taken newest first, so FCFS order holds
        out.dropped_request_ids.append(req.request_id)
        out.num_preempted += 1
        self.num_preemptions += 1

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> int:
        passed_over: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            req = self.waiting.popleft()
            cached = self.kv.find_cached_prefix(req)
            n = self._num_new_tokens(req, cached.num_tokens, budget)
            if n <= 0:
                passed_over.append(req)  # waiting for media embeddings
                continue
            if not self.kv.allocate(req, n, cached):
                self.waiting.appendleft(req)
                break
            self._start(req, cached)
            out.new_requests.append(self._new_request_data(req))
            out.sequences.append(self._slice(req, n))
            budget -= n
        self.waiting.extendleft(reversed(passed_over))
        return budget

    def _start(self, req: Request, cached: CachedPrefix) -> None:
        if req.num_cached_tokens < 0:  # first admission, not a resume after preemption
            req.num_cached_tokens = min(cached.num_tokens, req.num_prompt_tokens)
            self.kv.record_lookup(req, cached)
        req.num_computed_tokens = cached.num_tokens
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def _slice(self, req: Request, n: int) -> ScheduledSequence:
        start = req.num_computed_tokens
        token_ids = req.all_token_ids[start : start + n]
        block_ids = self.kv.block_ids(req.request_id)
        sample = start + n == req.num_tokens
        # positional: one is built per running request per step, and keywords cost twice as much
        return ScheduledSequence(req.request_id, token_ids, start, block_ids, sample)

    @staticmethod
    def _new_request_data(req: Request) -> NewRequestData:
        return NewRequestData(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=list(req.output_token_ids),
            mm_items=[item.ref for item in req.mm_items],
            mrope_positions=req.mrope_positions,
            rope_delta=req.rope_delta,
            sampling_params=req.sampling_params,
        )

    # ---- update ---------------------------------------------------------------------------

    def update_from_output(
        self, out: SchedulerOutput, sampled: dict[str, int]
    ) -> list[tuple[Request, list[int]]]:
        """Advance requests by one executed step; returns (request, new token ids) per request
        that produced a token (including those it just finished). A forced token replaces the
        sampled one here, on rank 0: the next step sends it to every rank like any token."""
        updates = []
        requests, running = self.requests, RequestStatus.RUNNING
        for seq in out.sequences:
            rid = seq.request_id
            req = requests.get(rid)
            if req is None or req.status is not running:
                continue  # aborted between schedule and update
            req.num_computed_tokens = seq.start + len(seq.token_ids)
            if not seq.sample:
                continue
            token = req.next_output_token(sampled[rid])
            req.append_output_token(token)
            self._check_stop(req, token)
            updates.append((req, [token]))
        return updates

    def _check_stop(self, req: Request, token: int) -> None:
        params = req.sampling_params
        if token in params.stop_token_ids:
            self.finish_request(req, RequestStatus.FINISHED_STOPPED, token)
        elif not params.ignore_eos and token in req.eos_token_ids:
            self.finish_request(req, RequestStatus.FINISHED_STOPPED)
        elif req.num_output_tokens >= params.max_tokens or req.num_tokens >= self.max_model_len:
            self.finish_request(req, RequestStatus.FINISHED_LENGTH)
