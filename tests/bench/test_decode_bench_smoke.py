"""The decode benchmark end to end on CPU with the tiny widths: both engines on one weight set.

Same weights in both models means greedy decoding in float32 must give the same tokens; the rows
must carry a floor consistent with their own timing.
"""

from __future__ import annotations

import json

import pytest

from bench.decode_bench import main


def test_cpu_smoke_run_writes_consistent_rows(tmp_path, capsys) -> None:
    out = tmp_path / "rows.json"
    argv = ["--tiny", "--device", "cpu", "--layers", "2", "--batch-sizes", "1,4"]
    argv += ["--steps", "4", "--repeats", "1", "--prompt-len", "16", "--json", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    rows = {(r["impl"], r["batch"]): r for r in report["rows"]}
    assert set(rows) == {(i, b) for i in ("glimpse eager", "transformers") for b in (1, 4)}
    for r in rows.values():
        assert r["ms_per_step"] > 0 and r["floor_ms"] > 0
        assert r["ratio"] == pytest.approx(r["ms_per_step"] / r["floor_ms"])
        assert r["bw_fraction"] == pytest.approx(1 / r["ratio"])
    # batch 1 reads exactly top-k experts; batch 4 the distinct ones its router chose
    assert rows[("glimpse eager", 1)]["experts_read"] == 2
    assert 2 <= rows[("glimpse eager", 4)]["experts_read"] <= 4
    assert rows[("glimpse eager", 1)]["target"].startswith("P1 ")
    agree, n = report["greedy_agreement"]
    assert n == 5 and agree == n  # the prefill token + 4 decode steps, identical to transformers
    assert "ratio" in capsys.readouterr().out.splitlines()[-5]
