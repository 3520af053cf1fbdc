"""One generation request as the engine tracks it: tokens, media, KV progress and status.

Contract: a ``Request`` owns its prompt token ids, the media items placed in that prompt
(``MediaItem``: content hash, token spans, embeddings), its 3-D M-RoPE positions and the tokens
generated so far. ``num_computed_tokens`` counts tokens whose KV is in the cache; the scheduler
advances it and resets it to 0 on preemption (recompute). Status moves
WAITING -> RUNNING <-> PREEMPTED -> FINISHED_*. Media embeddings may arrive after admission
(``MediaItem.embeds`` is None until then); prefill stops before the first missing item.
``ForcingState`` follows a request's ``SamplingParams.forced`` policy over its tokens and says
which token replaces the sampled one (``next_output_token``); it lives on rank 0 only, since
workers are sent the chosen tokens.
Not here: block bookkeeping (``kv_cache_manager.py``), stop strings (``detokenizer.py``).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from decoder_service.engine.sampling_params import ForcedTokens, SamplingParams

_FINISHED = ("stop", "length", "abort")  # the values of the finished statuses


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        # ``_value_`` is the member's plain attribute; ``value`` goes through a descriptor, and
        # this is asked several times per request per step
        return self._value_ in _FINISHED


@dataclass(frozen=True)
class MediaRef:
    """What the runner needs to know about a media item, without the tensor (serialisable)."""

    content_hash: str  # equal hashes <=> equal embeddings (media bytes + processing params)
    spans: tuple[tuple[int, int], ...]  # [start, end) prompt positions filled by embedding rows
    modality: str = "image"  # "image" or "video"

    @property
    def offset(self) -> int:
        return self.spans[0][0]

    @property
    def end(self) -> int:
        return self.spans[-1][1]

    @property
    def num_embeds(self) -> int:
        return sum(e - s for s, e in self.spans)


@dataclass
class MediaItem:
    """An image or video placed in a prompt; ``embeds`` rows fill ``spans`` in order.

    An image occupies one span; a video one span per frame group (the timestamp text between
    groups is ordinary text).
    """

    content_hash: str
    spans: tuple[tuple[int, int], ...]
    modality: str = "image"
    embeds: torch.Tensor | None = None  # [num_embeds, hidden]; None until it arrives

    @classmethod
    def contiguous(
        cls,
        content_hash: str,
        offset: int,
        length: int,
        embeds: torch.Tensor | None = None,
        modality: str = "image",
    ) -> MediaItem:
        return cls(content_hash, ((offset, offset + length),), modality, embeds)

    @property
    def ref(self) -> MediaRef:
        return MediaRef(self.content_hash, tuple(self.spans), self.modality)

    @property
    def offset(self) -> int:
        return self.spans[0][0]

    @property
    def end(self) -> int:
        return self.spans[-1][1]

    @property
    def num_embeds(self) -> int:
        return sum(e - s for s, e in self.spans)


class ReasoningPhase(enum.Enum):
    NOT_STARTED = "not_started"  # no `<think>` yet in this turn
    THINKING = "thinking"  # inside an open `<think>` block
    OVER = "over"  # `</think>` seen: the rest is the answer


class ForcingState:
    """One request's progress through its ``ForcedTokens`` policy (see sampling_params.py)."""

    def __init__(self, policy: ForcedTokens, prompt_token_ids: list[int]) -> None:
        self.policy = policy
        self.pending: deque[int] = deque()  # tokens to force next, in order
        self.thought = 0  # tokens generated inside the open `<think>` block
        self.phase = _phase_at_end_of(prompt_token_ids, policy)
        if self.phase is ReasoningPhase.OVER:  # the prompt closed thinking itself
            self.pending.extend(policy.after_reasoning)

    def choose(self, sampled: int) -> int:
        """The next output token: the forced one when one is due, else ``sampled``."""
        p = self.policy
        if self.pending:
            token = self.pending.popleft()
        elif self._budget_spent():
            self._end_reasoning(p.after_think_end + p.after_reasoning)
            return p.think_end_id
        else:
            token = sampled
        self._advance(token)
        return token

    def _budget_spent(self) -> bool:
        budget = self.policy.thinking_budget
        return (
            self.phase is ReasoningPhase.THINKING and budget is not None and self.thought >= budget
        )

    def _advance(self, token: int) -> None:
        p = self.policy
        if self.phase is ReasoningPhase.OVER:
            return
        if token == p.think_end_id:
            # the model closed thinking itself: only the tool call (if any) needs its lead-in
            self._end_reasoning(p.after_think_end + p.after_reasoning if p.after_reasoning else ())
        elif self.phase is ReasoningPhase.THINKING:
            self.thought += 1
        elif token == p.think_start_id:
            self.phase = ReasoningPhase.THINKING

    def _end_reasoning(self, then: tuple[int, ...]) -> None:
        self.phase = ReasoningPhase.OVER
        self.pending.extend(then)


def _phase_at_end_of(prompt: list[int], policy: ForcedTokens) -> ReasoningPhase:
    # The last marker after the last turn start decides; earlier turns are history (their
    # closed `<think></think>` blocks say nothing about the turn being generated).
    for token in reversed(prompt):
        if token == policy.think_start_id:
            return ReasoningPhase.THINKING
        if token == policy.think_end_id:
            return ReasoningPhase.OVER
        if token == policy.turn_start_id:
            break
    return ReasoningPhase.NOT_STARTED


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    mm_items: list[MediaItem] = field(default_factory=list)  # sorted by offset
    mrope_positions: torch.Tensor | None = None  # [3, num_prompt_tokens] int64; None = 1-D text
    rope_delta: int = 0  # position of token n >= prompt length is n + rope_delta
    arrival_time: float = field(default_factory=time.monotonic)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = -1  # prompt tokens served by the prefix cache; -1 = not scheduled yet
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks
    stop_reason: str | int | None = None  # the stop string or stop token that ended it

    def __post_init__(self) -> None:
        self.mm_items.sort(key=lambda item: item.offset)
        self._all_token_ids = list(self.prompt_token_ids)
        forced = self.sampling_params.forced
        self.forcing = None if forced is None else ForcingState(forced, self.prompt_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt followed by generated tokens (kept as one list; do not mutate)."""
        return self._all_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        status = self.status
        return status.value if status.finished else None

    def next_output_token(self, sampled: int) -> int:
        """The token to append: ``sampled``, unless the forcing policy puts another in its place."""
        return sampled if self.forcing is None else self.forcing.choose(sampled)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)

    def computable_until(self, start: int) -> int:
        """Tokens [start, n) can be computed now: prefill stops before an item still missing
        its embeddings (tokens already in the KV cache need none)."""
        for item in self.mm_items:
            if item.embeds is None and item.end > start:
                return max(item.offset, start)
        return self.num_tokens
