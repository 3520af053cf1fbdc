"""Real Glimpse processes on 127.0.0.1 for the end-to-end tests.

``start_serve`` runs ``glimpse serve`` (encoder + decoder + gateway) with the flags given and waits,
bounded, until its gateway answers /health with 200; ``start_text_pair`` runs a text-only decoder
and a gateway (no encoder) for checkpoints whose vision half is irrelevant. ``stop`` sends SIGTERM
and waits (bounded), then kills. Logs go to files that are shown when startup fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0
# limits the session's system is started with (conftest.py) and the bad-input tests rely on
MAX_MODEL_LEN = 2048
MAX_IMAGES = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    # One intra-op thread per process: the tiny model gains nothing from more, and the test
    # machine's few cores are shared by three servers and the test process.
    env = {k: v for k, v in os.environ.items() if k != "GLIMPSE_API_KEY"}
    return env | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "0"}


@dataclass
class System:
    url: str  # gateway base URL
    decoder_port: int
    metrics_port: int  # decoder /metrics (0 = none)
    processes: list[subprocess.Popen]
    logs: list[Path] = field(default_factory=list)

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in self.logs if p.exists())

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False


def _popen(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, cwd=REPO, env=child_env(), stdout=out, stderr=subprocess.STDOUT
        )


def _wait_healthy(system: System) -> System:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in system.processes):
            stop(system)
            raise RuntimeError(f"a Glimpse process exited during startup:\n{system.log_text()}")
        if system.healthy():
            return system
        time.sleep(0.2)
    stop(system)
    raise RuntimeError(f"Glimpse not healthy after {START_TIMEOUT_S}s:\n{system.log_text()}")


def start_serve(ckpt: Path, log_dir: Path, *flags: str) -> System:
    port, decoder_port, metrics_port = free_port(), free_port(), free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "glimpse.cli",
        "serve",
        "--model-path",
        str(ckpt),
        "--port",
        str(port),
        "--decoder-port",
        str(decoder_port),
        "--decoder-metrics-port",
        str(metrics_port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--log-dir",
        str(log_dir),
        "--startup-timeout",
        str(START_TIMEOUT_S),
        *flags,
    ]
    proc = _popen(cmd, log_dir / "serve.log")
    logs = [log_dir / f"{n}.log" for n in ("serve", "encoder", "decoder", "gateway")]
    return _wait_healthy(
        System(f"http://127.0.0.1:{port}", decoder_port, metrics_port, [proc], logs)
    )


def start_text_pair(ckpt: Path, log_dir: Path) -> System:
    port, decoder_port = free_port(), free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "glimpse.cli"]
    decoder = [*py, "decoder", "--model-path", str(ckpt), "--host", "127.0.0.1"]
    decoder += ["--port", str(decoder_port), "--device", "cpu", "--dtype", "float32"]
    decoder += ["--shutdown-drain-s", "0", "--shutdown-grace-s", "2"]
    gateway = [*py, "gateway", "--decoder-url", f"127.0.0.1:{decoder_port}", "--host"]
    gateway += ["127.0.0.1", "--port", str(port), "--log-level", "warning"]
    gateway += ["--reasoning-parser", "glm45", "--tool-call-parser", "glm45"]
    logs = [log_dir / "decoder.log", log_dir / "gateway.log"]
    procs = [_popen(decoder, logs[0]), _popen(gateway, logs[1])]
    return _wait_healthy(System(f"http://127.0.0.1:{port}", decoder_port, 0, procs, logs))


def stop(system: System) -> None:
    for proc in reversed(system.processes):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in system.processes:
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
