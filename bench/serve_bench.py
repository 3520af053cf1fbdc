"""The whole system under load in one command: checkpoint, `glimpse serve`, loads, metrics, logs.

``python -m bench.serve_bench --out DIR [--layers 46] [--vision-depth 24] [--loads
conc1:10,rate20:1000] [--output-len 128] [--decoder-args ...] [--encoder-args ...] [--env K=V]
[--tiny]`` writes a benchmark checkpoint (``bench/scaled_checkpoint.py``: real GLM-4.5V widths and
the released pixel budgets, weights drawn by ``--load-format dummy``; ``--tiny``: the tiny
checkpoint on the CPU, a smoke run), starts ``glimpse serve`` on it with both services' metrics
on, and runs each load of ``--loads`` in turn with ``glimpse bench serve``'s runner on the
VisionArena-shaped synthetic dataset: ``concN:P`` is P prompts at concurrency N, ``rateR:P`` is
P prompts arriving at R per second (Poisson). Each load's result is written to
``DIR/<load>.json`` in ``glimpse bench serve``'s format. Then it reads both services' metrics,
stops the system and prints, last, one table: requests done, output tokens/s, TTFT, TPOT and
ITL per load, the engine's step times by kind, the encoder's ViT throughput, and any failed
engine step's traceback from the decoder log (``DIR/logs``). ``--env CUDA_LAUNCH_BLOCKING=1``
makes such a traceback name the failing kernel.

Not a test: nothing is asserted. The P3 recipe is the default (``--quantization fp8``,
``--mem-fraction-static 0.7``, ``--max-running-requests 128``, context 8192).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from glimpse.bench.config import ServeBenchConfig
from glimpse.bench.report import (
    compute_metrics,
    format_errors,
    format_table,
    result_record,
    write_json,
)
from glimpse.bench.runner import run_serve

DEFAULT_DECODER_ARGS = (
    "--load-format dummy --quantization fp8 --mem-fraction-static 0.7 --max-running-requests 128"
)
DEFAULT_ENCODER_ARGS = "--load-format dummy"
# metric families summarised at the end: (family, label filter or "")
_METRICS = (
    ("vlm:engine_step_seconds", 'kind="decode"'),
    ("vlm:engine_step_seconds", 'kind="mixed"'),
    ("vlm:iteration_tokens_total", ""),
    ("vlm:request_queue_time_seconds", ""),
    ("vlm:encoder_vit_seconds", ""),
    ("vlm:encoder_vit_batch_patches", ""),
    ("vlm:encoder_latency_seconds", 'modality="image"'),
    ("vlm:media_fetch_seconds", ""),
)


@dataclass(frozen=True)
class Load:
    name: str  # as given, e.g. "conc1" or "rate20"
    num_prompts: int
    max_concurrency: int | None
    request_rate: float


def parse_loads(text: str) -> list[Load]:
    loads = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(conc|rate)(\d+(?:\.\d+)?):(\d+)", part)
        if m is None:
            raise ValueError(f"load {part!r} is not concN:PROMPTS or rateR:PROMPTS")
        kind, value, prompts = m.group(1), float(m.group(2)), int(m.group(3))
        if kind == "conc":
            loads.append(Load(part.split(":")[0], prompts, int(value), float("inf")))
        else:
            loads.append(Load(part.split(":")[0], prompts, None, value))
    if not loads:
        raise ValueError("no load given")
    return loads


def parse_metrics(text: str) -> dict[tuple[str, str], tuple[float, float]]:
    """(family, label filter) -> (sum, count) of the histograms in ``_METRICS``."""
    out = {}
    for family, labels in _METRICS:
        values = {}
        for stat in ("sum", "count"):
            pattern = rf"^{re.escape(family)}_{stat}(?:\{{([^}}]*)\}})? (\S+)$"
            total = 0.0
            for line_labels, value in re.findall(pattern, text, flags=re.M):
                if labels in line_labels:
                    total += float(value)
            values[stat] = total
        if values["count"]:
            out[family, labels] = (values["sum"], values["count"])
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_command(args: argparse.Namespace, ckpt: Path, ports: dict[str, int]) -> list[str]:
    cmd = [sys.executable, "-m", "glimpse.cli", "serve", "--model-path", str(ckpt)]
    cmd += ["--device", "cpu" if args.tiny else args.device, "--port", str(ports["gateway"])]
    cmd += ["--max-model-len", str(args.max_model_len), "--log-dir", str(args.out / "logs")]
    cmd += ["--decoder-metrics-port", str(ports["decoder"])]
    cmd += ["--encoder-metrics-port", str(ports["encoder"])]
    cmd += ["--startup-timeout", str(args.startup_timeout)]
    decoder_args = f"{args.decoder_args} --stats-log-interval 5".strip()
    if args.tiny:
        cmd += ["--dtype", "float32"]
    cmd += ["--decoder-args", decoder_args, "--encoder-args", args.encoder_args]
    return cmd


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"glimpse serve exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"glimpse serve not ready after {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _step_failure(log: Path, context: int = 12) -> str:
    """The last failed engine step's log record and the end of its traceback, or ''."""
    if not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(text) if "engine step failed" in line]
    if not starts:
        return ""
    start = end = starts[-1]
    # the traceback ends at its first unindented line after "Traceback": the exception itself
    seen_traceback = False
    for end in range(start + 1, len(text)):
        line = text[end]
        if line.startswith("Traceback"):
            seen_traceback = True
        elif seen_traceback and line and not line[0].isspace():
            break
    head = text[start : start + 2]
    tail = text[max(start + 2, end - context) : end + 1]
    gap = ["  ..."] if end - context > start + 2 else []
    return "\n".join(head + gap + tail)


def _summary_rows(results: list[tuple[Load, object]]) -> list[str]:
    rows = ["load        ok/total  out tok/s  mean TTFT ms  median TPOT ms  mean ITL ms"]
    for load, m in results:

        def ms(stats) -> str:
            return "-" if stats.mean_ms is None else f"{stats.mean_ms:.1f}"

        tpot = "-" if m.tpot.median_ms is None else f"{m.tpot.median_ms:.2f}"
        total = m.completed + m.failed
        rows.append(
            f"{load.name:<11} {m.completed:>4}/{total:<5} {m.output_throughput:>9.1f} "
            f"{ms(m.ttft):>13} {tpot:>15} {ms(m.itl):>12}"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=46)
    p.add_argument("--vision-depth", type=int, default=24)
    p.add_argument("--loads", default="conc1:10,rate20:1000")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--decoder-args", default=DEFAULT_DECODER_ARGS)
    p.add_argument("--encoder-args", default=DEFAULT_ENCODER_ARGS)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--timeout-s", type=float, default=600.0, help="per request")
    p.add_argument("--tiny", action="store_true", help="the tiny checkpoint on the CPU")
    args = p.parse_args(argv)
    loads = parse_loads(args.loads)
    env = dict(os.environ)
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            p.error(f"--env {item!r} is not KEY=VALUE")
        env[key] = value
    if args.tiny:
        args.decoder_args = args.decoder_args.replace("--quantization fp8", "")
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / "checkpoint"
    if not (ckpt / "config.json").exists():
        if args.tiny:
            from models.glm4v.tiny import write_tiny_checkpoint

            write_tiny_checkpoint(ckpt, seed=0)
        else:
            from bench.scaled_checkpoint import write_scaled_checkpoint

            write_scaled_checkpoint(ckpt, args.layers, args.vision_depth)
    ports = {name: _free_port() for name in ("gateway", "decoder", "encoder")}
    url = f"http://127.0.0.1:{ports['gateway']}"
    cmd = _serve_command(args, ckpt, ports)
    print("$", shlex.join(cmd), flush=True)
    (args.out / "logs").mkdir(exist_ok=True)
    with (args.out / "logs" / "serve.out").open("w") as serve_log:
        proc = subprocess.Popen(cmd, env=env, stdout=serve_log, stderr=subprocess.STDOUT)
    results, metrics = [], {}
    try:
        print(f"ready after {_wait_ready(proc, url, args.startup_timeout):.0f} s", flush=True)
        for load in loads:
            config = ServeBenchConfig(
                base_url=url,
                num_prompts=load.num_prompts,
                max_concurrency=load.max_concurrency,
                request_rate=load.request_rate,
                output_len=args.output_len,
                disable_progress=True,
                timeout_s=args.timeout_s,
            )
            run = run_serve(config)
            m = compute_metrics(run)
            print(f"== {load.name}\n{format_table(m, load.max_concurrency)}", flush=True)
            errors = format_errors(run)
            if errors:
                print(f"errors (most frequent first):\n{errors}", flush=True)
            record = result_record(run, m, url, {"load": load.name, **config.__dict__})
            write_json(args.out / f"{load.name}.json", record)
            results.append((load, m))
        for name in ("decoder", "encoder"):
            text = httpx.get(f"http://127.0.0.1:{ports[name]}/metrics", timeout=10).text
            metrics.update(parse_metrics(text))
    finally:
        _stop(proc)
    failure = _step_failure(args.out / "logs" / "decoder.log")
    print("\n".join(_summary_rows(results)))
    for (family, labels), (total, count) in metrics.items():
        print(f"{family}{{{labels}}}: {count:.0f} observed, mean {total / count:.4g}")
    if failure:
        print(f"a failed engine step (decoder log):\n{failure}")
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
