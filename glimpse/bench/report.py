"""Statistics and output of ``glimpse bench serve``: the result table and the JSON record.

Contract: ``compute_metrics(run)`` turns a ``BenchmarkRun`` into ``BenchmarkMetrics`` (counts,
token totals and throughputs over the successful requests; mean / median / P99 in milliseconds
of TTFT, TPOT, ITL and end-to-end latency; ``None`` where no request gave a sample).
``format_table`` renders them as text; ``result_record`` is the JSON document: every metric under
the same names as the table's, plus ``date``, ``base_url``, ``model``, ``args`` and per-request
arrays in seconds / tokens (``input_lens``, ``output_lens``, ``ttfts``, ``tpots``, ``itls``,
``e2els``, ``errors``), in send order. Failed requests appear in the arrays with zeros and their
error message.

Not here: sending requests or pacing them.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from glimpse.bench.runner import BenchmarkRun

_WIDTH = 50
# (JSON key prefix, table title, short name)
_LATENCIES = (
    ("ttft", "Time to First Token", "TTFT"),
    ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
    ("itl", "Inter-token Latency", "ITL"),
    ("e2el", "End-to-end Latency", "E2EL"),
)


@dataclass(frozen=True)
class LatencyStats:
    mean_ms: float | None
    median_ms: float | None
    p99_ms: float | None

    @classmethod
    def of(cls, seconds: list[float]) -> LatencyStats:
        if not seconds:
            return cls(None, None, None)
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        return cls(float(ms.mean()), float(np.median(ms)), float(np.percentile(ms, 99)))


@dataclass(frozen=True)
class BenchmarkMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # successful requests per second
    output_throughput: float  # output tokens per second
    total_token_throughput: float  # (input + output) tokens per second
    max_concurrency_observed: int
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats


def compute_metrics(run: BenchmarkRun) -> BenchmarkMetrics:
    good = [i for i, r in enumerate(run.results) if r.ok]
    ok = [run.results[i] for i in good]
    total_in = sum(run.input_tokens[i] for i in good)
    total_out = sum(r.output_tokens for r in ok)
    duration = max(run.duration_s, 1e-9)
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(run.results) - len(ok),
        duration_s=run.duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / duration,
        output_throughput=total_out / duration,
        total_token_throughput=(total_in + total_out) / duration,
        max_concurrency_observed=run.max_concurrency_observed,
        ttft=LatencyStats.of([r.ttft_s for r in ok]),
        tpot=LatencyStats.of([t for r in ok if (t := r.tpot_s) is not None]),
        itl=LatencyStats.of([g for r in ok for g in r.itl_s]),
        e2el=LatencyStats.of([r.e2e_s for r in ok]),
    )


def format_table(m: BenchmarkMetrics, max_concurrency: int | None = None) -> str:
    def row(label: str, value: object) -> str:
        if isinstance(value, float):
            value = f"{value:.2f}"
        elif value is None:
            value = "n/a"
        return f"{label:<40}{value}"

    lines = [" Serving Benchmark Result ".center(_WIDTH, "=")]
    lines += [
        row("Successful requests:", m.completed),
        row("Failed requests:", m.failed),
        row("Maximum request concurrency:", max_concurrency),
        row("Max concurrency observed:", m.max_concurrency_observed),
        row("Benchmark duration (s):", m.duration_s),
        row("Total input tokens:", m.total_input_tokens),
        row("Total generated tokens:", m.total_output_tokens),
        row("Request throughput (req/s):", m.request_throughput),
        row("Output token throughput (tok/s):", m.output_throughput),
        row("Total token throughput (tok/s):", m.total_token_throughput),
    ]
    for key, title, short in _LATENCIES:
        stats: LatencyStats = getattr(m, key)
        lines.append(title.center(_WIDTH, "-"))
        lines.append(row(f"Mean {short} (ms):", stats.mean_ms))
        lines.append(row(f"Median {short} (ms):", stats.median_ms))
        lines.append(row(f"P99 {short} (ms):", stats.p99_ms))
    lines.append("=" * _WIDTH)
    return "\n".join(lines)


def format_errors(run: BenchmarkRun, limit: int = 5) -> str:
    """The most frequent error messages with their counts ('' when every request succeeded)."""
    counts = Counter(r.error for r in run.results if not r.ok)
    return "\n".join(f"{n} x {msg}" for msg, n in counts.most_common(limit))


def result_record(
    run: BenchmarkRun, m: BenchmarkMetrics, base_url: str, args: dict[str, object]
) -> dict[str, object]:
    record: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_url": base_url,
        "model": run.model,
        "args": {k: _json_safe(v) for k, v in args.items()},
    }
    flat = asdict(m)
    for key, _, _ in _LATENCIES:
        stats = flat.pop(key)
        for stat in ("mean", "median", "p99"):
            record[f"{stat}_{key}_ms"] = stats[f"{stat}_ms"]
    record.update(flat)
    rs = run.results
    record["input_lens"] = list(run.input_tokens)
    record["output_lens"] = [r.output_tokens if r.ok else 0 for r in rs]
    record["ttfts"] = [r.ttft_s if r.ok else 0.0 for r in rs]
    record["tpots"] = [r.tpot_s or 0.0 for r in rs]
    record["itls"] = [list(r.itl_s) if r.ok else [] for r in rs]
    record["e2els"] = [r.e2e_s if r.ok else 0.0 for r in rs]
    record["errors"] = [r.error for r in rs]
    return record


def write_json(path: str | Path, record: dict[str, object]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: strict JSON readers reject NaN / Infinity, so none may slip through.
    Path(path).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")


def _json_safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf"
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
