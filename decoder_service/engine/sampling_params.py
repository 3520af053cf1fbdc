"""Per-request sampling and stopping parameters, validated before a request is admitted.

Contract: ``SamplingParams`` is frozen; ``validate(vocab_size)`` raises
``InvalidSamplingParamsError`` (with ``param`` set) for any value the sampler cannot honour.
Temperature 0 means greedy. ``top_k`` of 0 or -1 disables top-k. Stop strings are matched on the
detokenized text and never appear in it; stop token ids and the checkpoint's EOS ids (unless
``ignore_eos``) end generation and are kept in ``token_ids``. ``ForcedTokens`` is the optional
policy that overrides sampled tokens around the model's `<think>` block (thinking budget, a tool
call required once reasoning is over). How the values are applied lives in ``sampler.py``,
``detokenizer.py`` and ``request.py`` (``ForcingState``), not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from decoder_service.engine.errors import InvalidSamplingParamsError

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class ForcedTokens:
    """Tokens the engine writes instead of the sampled ones, around the `<think>` block.

    Reasoning is open after a `<think>` and over after a `</think>`; the prompt decides where a
    request starts (its last marker after the last ``turn_start_id``; neither: not yet thinking).
    Inside an open block, once ``thinking_budget`` tokens were generated the next token is forced
    to `</think>`, followed by ``after_think_end``. Once reasoning is over (at that forced or a
    generated `</think>`, or at the first output token when the prompt already closed it),
    ``after_reasoning`` is forced; when there is such a sequence, a generated `</think>` gets
    ``after_think_end`` before it too. Forced tokens are output tokens like any other (they
    count towards ``max_tokens``, show in the text and carry the model's log-probability).
    """

    think_start_id: int  # `<think>`
    think_end_id: int  # `</think>`
    thinking_budget: int | None = None  # generated tokens allowed inside <think>; None = no limit
    after_think_end: tuple[int, ...] = ()  # follows a forced `</think>` (GLM: the "\n")
    after_reasoning: tuple[int, ...] = ()  # forced once reasoning is over (e.g. `<tool_call>`)
    turn_start_id: int | None = None  # prompt tokens before the last of these are history

    def __post_init__(self) -> None:
        object.__setattr__(self, "after_think_end", tuple(self.after_think_end))
        object.__setattr__(self, "after_reasoning", tuple(self.after_reasoning))

    @property
    def token_ids(self) -> tuple[int, ...]:
        """Every id the policy may force or look for (for vocabulary checks)."""
        turn = () if self.turn_start_id is None else (self.turn_start_id,)
        markers = (self.think_start_id, self.think_end_id, *turn)
        return markers + self.after_think_end + self.after_reasoning


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # generated tokens at most (the stop token counts)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = -1  # keep the k most likely tokens; 0 or -1 = all
    min_p: float = 0.0  # drop tokens below min_p * p(most likely token)
    seed: int | None = None  # per-request seed: same seed, same tokens
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0  # subtracted once from logits of tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    stop: tuple[str, ...] = ()  # stop strings: generation ends before them
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens besides the checkpoint's EOS ids
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    logprobs: bool = False  # return the log-probability of each generated token
    top_logprobs: int = 0  # also return this many most likely alternatives per position
    skip_special_tokens: bool = True  # leave special tokens out of the text
    forced: ForcedTokens | None = None  # tokens forced around <think> (budget, tool choice)

    def __post_init__(self) -> None:
        # Accept lists / a single string from callers while keeping the dataclass hashable.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ``InvalidSamplingParamsError`` naming the first bad field."""

        def bad(param: str, why: str) -> InvalidSamplingParamsError:
            return InvalidSamplingParamsError(f"{param} {why}", param=param)

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise bad("max_tokens", f"must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise bad("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise bad("temperature", f"must be a finite number >= 0, got {self.temperature}")
        if not _finite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", f"must be -1, 0 or a positive integer, got {self.top_k}")
        if not _finite(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise bad("seed", f"must be an integer, got {self.seed!r}")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not -2.0 <= value <= 2.0:
                raise bad(name, f"must be in [-2, 2], got {value}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad(
                "top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}"
            )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "stop strings must be non-empty strings")
        for tok in self.stop_token_ids:
            if (
                not isinstance(tok, int)
                or tok < 0
                or (vocab_size is not None and tok >= vocab_size)
            ):
                raise bad("stop_token_ids", f"token id {tok!r} is outside the vocabulary")
        if self.forced is not None:
            self._validate_forced(self.forced, vocab_size, bad)

    @staticmethod
    def _validate_forced(forced: ForcedTokens, vocab_size: int | None, bad) -> None:
        budget = forced.thinking_budget
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
            raise bad("thinking_budget", f"must be an integer, got {budget!r}")
        if budget is not None and budget < 0:
            raise bad("thinking_budget", f"must be >= 0, got {budget}")
        for tok in forced.token_ids:
            if (
                isinstance(tok, bool)
                or not isinstance(tok, int)
                or tok < 0
                or (vocab_size is not None and tok >= vocab_size)
            ):
                raise bad("forced", f"token id {tok!r} is outside the vocabulary")


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
