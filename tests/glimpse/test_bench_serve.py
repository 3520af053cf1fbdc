"""``glimpse bench serve`` against an in-process fake OpenAI streaming server.

The fake (fake_openai_server.py, fixtures in conftest.py) streams a known number of chunks with
known delays (and usage), fails or stalls chosen requests and records what it received and how
many requests it held at once, so the measured numbers can be checked against what the server
really did.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fake_openai_server import FakeServer
from PIL import Image

from glimpse.bench.config import ServeBenchConfig
from glimpse.bench.dataset import (
    PHOTO_SIZES,
    SCREENSHOT_SIZES,
    build_requests,
    sample_image_specs,
)
from glimpse.bench.report import compute_metrics
from glimpse.bench.runner import arrival_offsets, run_serve
from glimpse.cli import main

REPO = Path(__file__).resolve().parents[2]


def _config(fake: FakeServer, **kw: object) -> ServeBenchConfig:
    base = dict(base_url=fake.url, dataset="text-synthetic", num_prompts=4, disable_progress=True)
    return ServeBenchConfig(**{**base, **kw})


def test_timings_and_tokens_follow_the_server(fake):
    fake.reset(ttft_s=0.25, gap_s=0.06, chunks=5, tokens_per_chunk=2)
    run = run_serve(_config(fake, output_len=77, api_key="k3y"))
    m = compute_metrics(run)
    assert m.completed == 4 and m.failed == 0 and run.model == "fake-model"
    for r in run.results:
        # The role-only chunk arrives at once; TTFT waits for the first reasoning chunk.
        assert 0.25 <= r.ttft_s < 0.25 + 0.2
        assert len(r.itl_s) == 4
        assert r.output_tokens == 10  # the server's usage, not the 5 chunks
        assert 0.25 + 4 * 0.06 <= r.e2e_s < 0.49 + 0.3
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 9)
    assert 60 <= m.itl.median_ms < 110
    assert 250 <= m.ttft.mean_ms < 450 and m.ttft.p99_ms >= m.ttft.median_ms
    assert m.total_output_tokens == 40 and m.total_input_tokens == 4 * 42
    assert m.output_throughput == pytest.approx(40 / run.duration_s)
    headers, payload = fake.seen[0]
    assert headers["authorization"] == "Bearer k3y"
    assert payload["model"] == "fake-model" and payload["max_tokens"] == 77
    assert payload["stream"] is True and payload["stream_options"] == {"include_usage": True}
    assert payload["ignore_eos"] is True


def test_without_usage_tokens_are_counted_per_chunk(fake):
    fake.reset(chunks=5, tokens_per_chunk=2, send_usage=False)
    run = run_serve(_config(fake, num_prompts=2, input_len=30, ignore_eos=False))
    assert [r.output_tokens for r in run.results] == [5, 5]
    assert run.input_tokens == [30, 30]  # the dataset's estimate when the server reports none
    assert all("ignore_eos" not in payload for _, payload in fake.seen)


def test_server_errors_and_stalls_fail_without_hanging(fake):
    fake.reset(fail_every=3)
    run = run_serve(_config(fake, num_prompts=9, max_concurrency=1))
    failed = [r for r in run.results if not r.ok]
    assert len(failed) == 3 and compute_metrics(run).completed == 6
    assert all("HTTP 500" in r.error and "injected failure" in r.error for r in failed)

    fake.reset(stall_every=2)
    t0 = time.monotonic()
    run = run_serve(_config(fake, num_prompts=4, max_concurrency=1, timeout_s=0.5))
    assert time.monotonic() - t0 < 6
    assert sum(not r.ok for r in run.results) == 2
    assert all("timed out" in r.error for r in run.results if not r.ok)


def test_unreachable_server_counts_every_request_failed(fake):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    run = run_serve(
        ServeBenchConfig(
            base_url=dead, model="m", num_prompts=3, disable_progress=True, dataset="text-synthetic"
        )
    )
    assert [r.ok for r in run.results] == [False] * 3 and all(r.error for r in run.results)


def test_arrivals_have_the_requested_rate_and_shape():
    for burstiness, cv in ((1.0, 1.0), (4.0, 0.5), (0.25, 2.0)):
        offsets = np.array(arrival_offsets(20001, 10.0, burstiness, seed=1))
        gaps = np.diff(offsets)
        assert offsets[0] == 0 and (gaps >= 0).all()
        assert gaps.mean() == pytest.approx(0.1, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)
    assert arrival_offsets(5, float("inf"), 1.0, seed=0) == [0.0] * 5
    assert arrival_offsets(50, 3.0, 1.0, seed=7) == arrival_offsets(50, 3.0, 1.0, seed=7)


def test_poisson_run_lasts_about_num_over_rate(fake):
    fake.reset(ttft_s=0.01, gap_s=0.005, chunks=2)
    run = run_serve(_config(fake, num_prompts=30, request_rate=20.0, seed=3))
    last = arrival_offsets(30, 20.0, 1.0, seed=3)[-1]
    # Nothing may be sent ahead of its schedule; the run ends soon after the last arrival.
    assert last <= run.duration_s < last + 1.0
    assert 0.5 * 29 / 20 < run.duration_s < 2 * 29 / 20 + 1.0
    assert compute_metrics(run).completed == 30


def test_max_concurrency_is_respected(fake):
    fake.reset(ttft_s=0.1, chunks=2)
    run = run_serve(_config(fake, num_prompts=12, max_concurrency=3))
    assert fake.peak == 3 and run.max_concurrency_observed == 3
    fake.reset(ttft_s=0.2, chunks=2)
    run = run_serve(_config(fake, num_prompts=12))
    assert fake.peak == 12 and run.max_concurrency_observed == 12  # no hidden client-side cap


def test_cli_prints_the_table_and_writes_json(fake, tmp_path, capsys):
    out = tmp_path / "res" / "bench.json"
    argv = ["bench", "serve", "--base-url", fake.url, "--num-prompts", "5", "--api-key", "s"]
    argv += ["--dataset", "text-synthetic", "--disable-progress", "--result-json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    for label in (
        "Successful requests:",
        "Benchmark duration (s):",
        "Mean TTFT (ms):",
        "P99 ITL (ms):",
        "Median E2EL (ms):",
        "Max concurrency observed:",
    ):
        assert label in text
    record = json.loads(out.read_text())
    keys = {
        "date",
        "base_url",
        "model",
        "args",
        "completed",
        "failed",
        "duration_s",
        "total_input_tokens",
        "total_output_tokens",
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "max_concurrency_observed",
        "input_lens",
        "output_lens",
        "ttfts",
        "tpots",
        "itls",
        "e2els",
        "errors",
    }
    keys |= {
        f"{s}_{k}_ms" for s in ("mean", "median", "p99") for k in ("ttft", "tpot", "itl", "e2el")
    }
    assert keys <= record.keys()
    assert record["base_url"] == fake.url and record["completed"] == 5
    assert record["args"]["request_rate"] == "inf" and "api_key" not in record["args"]
    assert all(len(record[k]) == 5 for k in ("ttfts", "itls", "e2els", "output_lens"))
    assert record["mean_ttft_ms"] == pytest.approx(1000 * np.mean(record["ttfts"]))


def test_dataset_is_deterministic_with_the_intended_size_mix():
    a = build_requests("visionarena-synthetic", 6, 40, seed=5)
    assert a == build_requests("visionarena-synthetic", 6, 40, seed=5)
    assert a != build_requests("visionarena-synthetic", 6, 40, seed=6)
    for req in a:
        image_part, text_part = req.messages[0]["content"]
        assert abs(len(text_part["text"].split()) - 40) <= 1
        url = image_part["image_url"]["url"]
        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert img.size == (req.image.width, req.image.height)
        want = ("JPEG", "image/jpeg") if req.image.kind == "photo" else ("PNG", "image/png")
        assert img.format == want[0] and url.startswith(f"data:{want[1]};base64,")

    specs = sample_image_specs(3000, seed=0, image_variants=3)
    photos = [s for s in specs if s.kind == "photo"]
    shots = [s for s in specs if s.kind == "screenshot"]
    assert 0.5 < len(photos) / len(specs) < 0.7
    landscape = {(w, h) for w, h in PHOTO_SIZES}
    assert all((s.width, s.height) in landscape or (s.height, s.width) in landscape for s in photos)
    assert 0.2 < sum(s.height > s.width for s in photos) / len(photos) < 0.5
    assert {(s.width, s.height) for s in shots} == set(SCREENSHOT_SIZES)
    assert (4032, 3024) in {(s.width, s.height) for s in photos}
    assert {s.variant for s in specs} == {0, 1, 2}
    assert build_requests("text-synthetic", 3, 20, seed=0)[0].image is None


def test_real_cli_subprocess_with_images(fake, tmp_path):
    out = tmp_path / "cli.json"
    cmd = [
        sys.executable,
        "-m",
        "glimpse.cli",
        "bench",
        "serve",
        "--base-url",
        fake.url,
        "--num-prompts",
        "4",
        "--request-rate",
        "50",
        "--result-json",
        str(out),
        "--disable-progress",
        "--seed",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "Successful requests:" in proc.stdout
    assert json.loads(out.read_text())["completed"] == 4
    assert len(fake.seen) == 4
    for _, payload in fake.seen:
        assert payload["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/")
