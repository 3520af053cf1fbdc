"""Settings of one online serving benchmark run (``glimpse bench serve``).

Contract: ``ServeBenchConfig`` is the frozen set of knobs the dataset, the client and the runner
read; its defaults are the CLI defaults. Not here: argparse (``glimpse/bench/__init__.py``),
request building, timing or reporting.
"""

from __future__ import annotations

from dataclasses import dataclass

DATASETS = ("visionarena-synthetic", "text-synthetic")


@dataclass(frozen=True)
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"  # `glimpse serve`'s default gateway
    # None: the first id listed by GET /v1/models.
    model: str | None = None
    # Sent as ``Authorization: Bearer <key>`` when set.
    api_key: str | None = None
    num_prompts: int = 100
    # Mean arrivals per second; ``inf`` sends every request at time zero.
    request_rate: float = float("inf")
    # Gamma shape of the inter-arrival times: 1.0 is a Poisson process, below 1 burstier,
    # above 1 more evenly spaced. The mean interval is 1 / request_rate whatever the shape.
    burstiness: float = 1.0
    # None: no client-side cap on requests in flight.
    max_concurrency: int | None = None
    seed: int = 0
    # max_tokens of every request.
    output_len: int = 128
    # Ask the server to ignore end-of-sequence so every request produces output_len tokens.
    ignore_eos: bool = True
    dataset: str = "visionarena-synthetic"
    # Words of question text per request (about one token each).
    input_len: int = 90
    # Distinct images drawn per image size; requests beyond that reuse them (and may hit the
    # server's media cache).
    image_variants: int = 4
    result_json: str | None = None
    disable_progress: bool = False
    # Whole-request limit (connect to last byte), so a stalled stream fails instead of hanging.
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError("num_prompts must be at least 1")
        if not self.request_rate > 0:
            raise ValueError("request_rate must be positive (or inf)")
        if not self.burstiness > 0:
            raise ValueError("burstiness must be positive")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.output_len < 1 or self.input_len < 1:
            raise ValueError("output_len and input_len must be at least 1")
        if self.image_variants < 1:
            raise ValueError("image_variants must be at least 1")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {', '.join(DATASETS)}")
        if not self.timeout_s > 0:
            raise ValueError("timeout_s must be positive")
