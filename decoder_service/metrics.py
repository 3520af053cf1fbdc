"""Prometheus metrics of the decoder service, with vLLM's names under the project's `vlm:` prefix.

Contract: ``DecoderMetrics`` owns a private registry. ``observe_step(stats, outputs)`` is called
by the engine thread after every step (gauges for running/waiting requests and KV usage,
counters fed from the engine's cumulative preemption and prefix-cache numbers, token counters);
``RequestTimer`` records one request's time to first token, time per output token, queue time
and end-to-end latency and its finish reason. Labels: ``model_name``, ``finished_reason`` and a
step's ``kind`` (decode / mixed) only (never request ids). ``serve_http(port)`` exposes them on
/metrics. ``StepLog`` (no Prometheus needed) logs one line of engine throughput every interval,
like vLLM's periodic stats line.
Not here: deciding what a request is (servicer.py), the engine itself.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from decoder_service.engine.engine import EngineStats, RequestOutput

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 640)
_TOKEN_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_STEP_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

log = logging.getLogger(__name__)


class DecoderMetrics:
    def __init__(self, model_name: str) -> None:
        r = self.registry = CollectorRegistry()
        m = ["model_name"]
        self.model_name = model_name
        self.running = Gauge(
            "vlm:num_requests_running", "Requests holding KV blocks.", m, registry=r
        ).labels(model_name)
        self.waiting = Gauge(
            "vlm:num_requests_waiting",
            "Requests queued, preempted or waiting for media.",
            m,
            registry=r,
        ).labels(model_name)
        self.kv_usage = Gauge(
            "vlm:kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", m, registry=r
        ).labels(model_name)
        self.prefix_hit_rate = Gauge(
            "vlm:prefix_cache_hit_rate",
            "Prefix-cache hits / queries since start (0-1).",
            m,
            registry=r,
        ).labels(model_name)
        self.prefix_queries = Counter(
            "vlm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            m,
            registry=r,
        ).labels(model_name)
        self.prefix_hits = Counter(
            "vlm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", m, registry=r
        ).labels(model_name)
        self.preemptions = Counter(
            "vlm:num_preemptions", "Requests preempted (recomputed later).", m, registry=r
        ).labels(model_name)
        self.prompt_tokens = Counter(
            "vlm:prompt_tokens", "Prompt tokens of finished requests.", m, registry=r
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vlm:generation_tokens", "Generated tokens.", m, registry=r
        ).labels(model_name)
        self.success = Counter(
            "vlm:request_success",
            "Finished requests by reason (stop, length, abort).",
            [*m, "finished_reason"],
            registry=r,
        )
        self.aborted = Counter(
            "vlm:num_aborted_requests",
            "Requests aborted (client cancelled, deadline, Abort).",
            m,
            registry=r,
        ).labels(model_name)
        self.failed = Counter(
            "vlm:request_failures",
            "Requests refused or failed, by gRPC code.",
            [*m, "code"],
            registry=r,
        )
        self.ttft = Histogram(
            "vlm:time_to_first_token_seconds",
            "Arrival to first token.",
            m,
            buckets=_LATENCY,
            registry=r,
        ).labels(model_name)
        self.tpot = Histogram(
            "vlm:time_per_output_token_seconds",
            "Mean time between output tokens per request.",
            m,
            buckets=_TOKEN_LATENCY,
            registry=r,
        ).labels(model_name)
        self.itl = Histogram(
            "vlm:inter_token_latency_seconds",
            "Time between consecutive output chunks.",
            m,
            buckets=_TOKEN_LATENCY,
            registry=r,
        ).labels(model_name)
        self.e2e = Histogram(
            "vlm:e2e_request_latency_seconds",
            "Arrival to the last token.",
            m,
            buckets=_LATENCY,
            registry=r,
        ).labels(model_name)
        self.queue_time = Histogram(
            "vlm:request_queue_time_seconds",
            "Arrival to admission (media encoded).",
            m,
            buckets=_LATENCY,
            registry=r,
        ).labels(model_name)
        self.step_seconds = Histogram(
            "vlm:engine_step_seconds",
            "Wall time of one engine step; decode: one token per request, mixed: prefill in it.",
            [*m, "kind"],
            buckets=_TOKEN_LATENCY,
            registry=r,
        )
        self.step_tokens = Histogram(
            "vlm:iteration_tokens_total",
            "Tokens computed in one engine step.",
            m,
            buckets=_STEP_TOKENS,
            registry=r,
        ).labels(model_name)
        self._last = EngineStats(0, 0, 0.0, 0, 0, 0, 0)

    def observe_step(self, stats: EngineStats, outputs: list[RequestOutput]) -> None:
        """Engine thread, after every step (also idle ones, with no outputs)."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        last = self._last
        self.preemptions.inc(max(0, stats.num_preemptions - last.num_preemptions))
        self.prefix_queries.inc(max(0, stats.prefix_queries - last.prefix_queries))
        self.prefix_hits.inc(max(0, stats.prefix_hits - last.prefix_hits))
        if stats.prefix_queries:
            self.prefix_hit_rate.set(stats.prefix_hits / stats.prefix_queries)
        self._last = stats
        generated = sum(len(o.new_token_ids) for o in outputs)
        if generated:
            self.generation_tokens.inc(generated)
        step = stats.last_step
        if step is not None:
            self.step_seconds.labels(self.model_name, step.kind).observe(step.seconds)
            self.step_tokens.observe(step.num_tokens)

    def serve_http(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)


@dataclass
class _KindTotals:
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    max_seconds: float = 0.0


class StepLog:
    """Logs, every ``interval_s`` with steps in it, the steps of each kind (count, mean and
    longest wall time, tokens computed), tokens generated per second, and the running, waiting
    and KV figures at the end of the interval. Engine thread only."""

    def __init__(self, interval_s: float, clock=time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._start = clock()
        self._kinds: dict[str, _KindTotals] = {}
        self._generated = 0

    def observe_step(self, stats: EngineStats, outputs: list[RequestOutput]) -> None:
        step = stats.last_step
        if step is not None:
            t = self._kinds.setdefault(step.kind, _KindTotals())
            t.steps += 1
            t.seconds += step.seconds
            t.tokens += step.num_tokens
            t.max_seconds = max(t.max_seconds, step.seconds)
        self._generated += sum(len(o.new_token_ids) for o in outputs)
        now = self._clock()
        elapsed = now - self._start
        if elapsed < self.interval_s:
            return
        if self._kinds:
            log.info("%s", self.summary(stats, elapsed))
        self._start, self._kinds, self._generated = now, {}, 0

    def summary(self, stats: EngineStats, elapsed: float) -> str:
        parts = [
            f"{kind} {t.steps} steps ({1e3 * t.seconds / t.steps:.1f} ms mean, "
            f"{1e3 * t.max_seconds:.1f} max, {t.tokens / t.steps:.0f} tokens)"
            for kind, t in sorted(self._kinds.items())
        ]
        busy = sum(t.seconds for t in self._kinds.values())
        return (
            f"engine over {elapsed:.1f} s: {', '.join(parts)}; busy {100 * busy / elapsed:.0f}%; "
            f"generation {self._generated / elapsed:.1f} tok/s; running {stats.num_running}, "
            f"waiting {stats.num_waiting}, KV {100 * stats.kv_usage:.1f}%"
        )


class RequestTimer:
    """One request's latencies; all times from ``time.monotonic()``."""

    def __init__(self, metrics: DecoderMetrics | None) -> None:
        self.metrics = metrics
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self.last_token: float | None = None

    def admitted(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_time.observe(time.monotonic() - self.arrival)

    def tokens(self) -> None:
        now = time.monotonic()
        if self.metrics is not None:
            if self.first_token is None:
                self.metrics.ttft.observe(now - self.arrival)
            elif self.last_token is not None:
                self.metrics.itl.observe(now - self.last_token)
        if self.first_token is None:
            self.first_token = now
        self.last_token = now

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        m = self.metrics
        if m is None:
            return
        now = time.monotonic()
        m.e2e.observe(now - self.arrival)
        m.success.labels(m.model_name, reason).inc()
        m.prompt_tokens.inc(prompt_tokens)
        if reason == "abort":
            m.aborted.inc()
        if self.first_token is not None and completion_tokens > 1:
            m.tpot.observe((now - self.first_token) / (completion_tokens - 1))

    def failed(self, code: str) -> None:
        if self.metrics is not None:
            self.metrics.failed.labels(self.metrics.model_name, code).inc()
