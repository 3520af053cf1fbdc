"""A client that disconnects mid-stream aborts its generation and frees its KV cache.

Visible from outside only: the decoder's Prometheus endpoint shows the request running with KV in
use while the stream is read, and no running request, no KV in use and one more aborted request
after the client hangs up.
"""

from __future__ import annotations

import time

import httpx
from e2e_processes import System


def scrape(system: System) -> dict[str, float]:
    body = httpx.get(f"http://127.0.0.1:{system.metrics_port}/metrics", timeout=5).text
    values: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("vlm:"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_disconnect_mid_stream_aborts_and_frees_the_kv_cache(system, model_name):
    before = scrape(system)
    body = {
        "model": model_name,
        "messages": [{"role": "user", "content": "Count to a thousand."}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{system.v1}/chat/completions", json=body, timeout=60) as reply:
        assert reply.status_code == 200
        lines = reply.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: {") for line in received)
        during = scrape(system)
        assert during["vlm:num_requests_running"] >= 1
        assert during["vlm:kv_cache_usage_perc"] > 0
    # the stream is closed: the gateway cancels the gRPC call, the decoder aborts the request
    assert wait_until(
        lambda: (
            scrape(system)["vlm:num_aborted_requests_total"]
            >= before["vlm:num_aborted_requests_total"] + 1
        )
    )
    after = scrape(system)
    assert after["vlm:num_requests_running"] == 0
    assert after["vlm:kv_cache_usage_perc"] == 0
    assert after["vlm:generation_tokens_total"] - before["vlm:generation_tokens_total"] < 1500
