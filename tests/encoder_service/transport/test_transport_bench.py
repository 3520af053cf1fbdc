"""bench/transport_bench.py runs on a CPU host and reports what a decoder waits for."""

from __future__ import annotations

import json

from bench import transport_bench


def test_bench_reports_each_path_with_the_rpc_floor_beside_the_handoff(tmp_path, capsys):
    out = tmp_path / "transport.json"
    args = ["--rows", "64", "--hidden", "128", "--iters", "3", "--warmup", "1"]
    assert transport_bench.main([*args, "--pool-mb", "1", "--json", str(out)]) == 0
    results = {r["path"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"shm", "grpc_stream"}
    for r in results.values():
        assert r["nbytes"] == 64 * 128 * 2
        assert 0 < r["rpc_floor_p50_ms"] and 0 < r["p50_ms"] <= r["handoff_p50_ms"]
        assert r["encode_p50_ms"] <= r["handoff_p50_ms"] and r["ack_p50_ms"] > 0
    assert "rpc ms" in capsys.readouterr().out


def test_bench_runs_only_the_paths_asked_for(tmp_path):
    out = tmp_path / "transport.json"
    args = ["--rows", "16", "--hidden", "64", "--iters", "2", "--warmup", "0", "--pool-mb", "1"]
    assert transport_bench.main([*args, "--paths", "grpc_stream", "--json", str(out)]) == 0
    assert [r["path"] for r in json.loads(out.read_text())["results"]] == ["grpc_stream"]
