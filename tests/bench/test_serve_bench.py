"""The one-command system benchmark: its load syntax, its metrics summary, and a smoke run of the
whole system on the tiny checkpoint (CPU) that must finish every request."""

from __future__ import annotations

import json
import math

import pytest

from bench.serve_bench import Load, main, parse_loads, parse_metrics


def test_loads_parse_and_bad_ones_are_refused():
    assert parse_loads("conc1:10, rate20:1000") == [
        Load("conc1", 10, 1, math.inf),
        Load("rate20", 1000, None, 20.0),
    ]
    assert parse_loads("rate2.5:4") == [Load("rate2.5", 4, None, 2.5)]
    for bad in ("", "conc:3", "burst5:10", "rate20"):
        with pytest.raises(ValueError):
            parse_loads(bad)


def test_metrics_summary_sums_matching_series():
    text = "\n".join(
        [
            "# HELP vlm:engine_step_seconds x",
            'vlm:engine_step_seconds_sum{kind="decode",model_name="m"} 0.5',
            'vlm:engine_step_seconds_count{kind="decode",model_name="m"} 10.0',
            'vlm:engine_step_seconds_sum{kind="mixed",model_name="m"} 2.0',
            'vlm:engine_step_seconds_count{kind="mixed",model_name="m"} 4.0',
            "vlm:encoder_vit_seconds_sum 3.0",
            "vlm:encoder_vit_seconds_count 6.0",
        ]
    )
    got = parse_metrics(text)
    assert got["vlm:engine_step_seconds", 'kind="decode"'] == (0.5, 10.0)
    assert got["vlm:engine_step_seconds", 'kind="mixed"'] == (2.0, 4.0)
    assert got["vlm:encoder_vit_seconds", ""] == (3.0, 6.0)
    assert ("vlm:media_fetch_seconds", "") not in got  # absent families are left out


def test_tiny_system_smoke_run_finishes_every_request(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        ["--tiny", "--out", str(out), "--loads", "conc1:2,rate50:4", "--output-len", "3"]
        + ["--startup-timeout", "120", "--timeout-s", "60"]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for name, n in (("conc1", 2), ("rate50", 4)):
        record = json.loads((out / f"{name}.json").read_text())
        assert record["completed"] == n and record["failed"] == 0
        assert record["total_output_tokens"] == 3 * n
    summary = printed[printed.index("load        ok/total") :]
    assert "conc1          2/2" in summary and "rate50         4/4" in summary
    assert 'vlm:engine_step_seconds{kind="decode"}' in summary
    assert "vlm:encoder_vit_seconds{}" in summary
