"""Pacing and concurrency of ``glimpse bench serve``: send every request on its schedule.

Contract: ``run_serve(config)`` resolves the model, builds every payload (before the clock
starts), sends them on the arrival schedule and returns a ``BenchmarkRun`` (per-request results,
wall duration, the most requests observed in flight). ``arrival_offsets`` is the schedule: gamma
inter-arrival times with shape ``burstiness`` and mean ``1 / request_rate`` (shape 1 is Poisson;
an infinite rate sends everything at time zero). ``max_concurrency`` caps requests in flight
with a semaphore taken after a request's arrival, so a capped run queues on the client.

Not here: the HTTP exchange and timing of one request (``client.py``), statistics and output
(``report.py``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import numpy as np

from glimpse.bench.client import RequestResult, auth_headers, list_models, send_chat_request
from glimpse.bench.config import ServeBenchConfig
from glimpse.bench.dataset import BenchRequest, build_requests


@dataclass
class BenchmarkRun:
    model: str
    results: list[RequestResult]
    input_tokens: list[int]  # per request: server usage when reported, else the text estimate
    duration_s: float  # first send to last completion
    max_concurrency_observed: int


def arrival_offsets(num: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent (first at 0, non-decreasing)."""
    if math.isinf(request_rate):
        return [0.0] * num
    rng = np.random.default_rng([seed, 3])
    # Gamma(k, theta) has mean k * theta: theta = 1 / (rate * k) keeps the mean gap at 1 / rate
    # while the coefficient of variation is 1 / sqrt(k).
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def chat_payload(request: BenchRequest, model: str, config: ServeBenchConfig) -> dict:
    payload = {
        "model": model,
        "messages": request.messages,
        "max_tokens": config.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        payload["ignore_eos"] = True
    return payload


def run_serve(config: ServeBenchConfig) -> BenchmarkRun:
    return asyncio.run(_run_serve(config))


async def _run_serve(config: ServeBenchConfig) -> BenchmarkRun:
    base_url = config.base_url.rstrip("/")
    timeout = httpx.Timeout(config.timeout_s)
    async with httpx.AsyncClient(timeout=timeout) as probe:
        model = config.model or await _first_model(probe, base_url, config.api_key)
    requests = build_requests(
        config.dataset, config.num_prompts, config.input_len, config.seed, config.image_variants
    )
    payloads = [chat_payload(r, model, config) for r in requests]
    offsets = arrival_offsets(
        config.num_prompts, config.request_rate, config.burstiness, config.seed
    )
    results, duration, peak = await run_requests(config, payloads, offsets)
    input_tokens = [
        res.prompt_tokens if res.prompt_tokens is not None else req.prompt_words
        for res, req in zip(results, requests, strict=True)
    ]
    return BenchmarkRun(model, results, input_tokens, duration, peak)


async def _first_model(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> str:
    models = await list_models(client, base_url, api_key)
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]


async def run_requests(
    config: ServeBenchConfig, payloads: Sequence[dict], offsets: Sequence[float]
) -> tuple[list[RequestResult], float, int]:
    """Send ``payloads[i]`` at ``offsets[i]``; returns (results in input order, duration, peak)."""
    url = f"{config.base_url.rstrip('/')}/v1/chat/completions"
    headers = auth_headers(config.api_key)
    cap = config.max_concurrency
    # httpx's pool holds 100 connections by default: a request waiting for one would count the
    # wait in its TTFT, so the pool is as large as the allowed concurrency.
    limits = httpx.Limits(max_connections=cap, max_keepalive_connections=cap)
    semaphore = asyncio.Semaphore(cap) if cap is not None else None
    in_flight = 0
    peak = 0
    progress = _progress(len(payloads), config.disable_progress)

    async def one(payload: dict, offset: float, start: float) -> RequestResult:
        nonlocal in_flight, peak
        delay = start + offset - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if semaphore is not None:
            await semaphore.acquire()
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await send_chat_request(client, url, payload, headers, config.timeout_s)
        finally:
            in_flight -= 1
            if semaphore is not None:
                semaphore.release()
            if progress is not None:
                progress.update(1)

    timeout = httpx.Timeout(config.timeout_s)
    try:
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            start = time.perf_counter()
            tasks = [one(p, o, start) for p, o in zip(payloads, offsets, strict=True)]
            results = await asyncio.gather(*tasks)
            duration = time.perf_counter() - start
    finally:
        if progress is not None:
            progress.close()
    return list(results), duration, peak


def _progress(total: int, disabled: bool):
    if disabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req")
