"""Running `glimpse gateway` as a real process on 127.0.0.1 for tests.

``start_gateway`` launches one (flags passed through), waits with a bounded loop until /health
answers, and returns a ``Gateway``; ``stop_gateway`` terminates it. Output goes to a log file that
is shown when startup fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-test-0123456789"
_START_TIMEOUT_S = 60.0


@dataclass
class Gateway:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log: Path

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gateway(
    tmp: Path, decoder_port: int, *extra: str, env: dict[str, str] | None = None
) -> Gateway:
    port = free_port()
    log = tmp / f"gateway-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "glimpse.cli",
        "gateway",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--decoder-url",
        f"127.0.0.1:{decoder_port}",
        "--log-level",
        "warning",
        *extra,
    ]
    full_env = {k: v for k, v in os.environ.items() if k != "GLIMPSE_API_KEY"} | (env or {})
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    gw = Gateway(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited early:\n{log.read_text()}")
        try:
            httpx.get(f"{gw.url}/health", timeout=1.0)
            return gw
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"gateway did not start in {_START_TIMEOUT_S}s:\n{log.read_text()}")


def stop_gateway(gw: Gateway) -> None:
    gw.process.terminate()
    try:
        gw.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        gw.process.kill()
        gw.process.wait(timeout=10)
