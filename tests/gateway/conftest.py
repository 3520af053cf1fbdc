"""Fixtures for gateway tests: a fake decoder in-process and real gateway processes on 127.0.0.1.

``fake_decoder`` (session): the scripted gRPC decoder of fake_decoder.py.
``gateway`` (session): `glimpse gateway` with both glm45 parsers, no API key.
``gateway_auth`` (session): the same with an API key from GLIMPSE_API_KEY.
``gateway_down`` (session): a gateway whose decoder address has nothing listening.
Each gateway is a subprocess started once; startup waits (bounded) until /health answers.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fake_decoder import FakeDecoder

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


def _start_gateway(
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


def _stop(gw: Gateway) -> None:
    gw.process.terminate()
    try:
        gw.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        gw.process.kill()
        gw.process.wait(timeout=10)


@pytest.fixture(scope="session")
def fake_decoder() -> Iterator[FakeDecoder]:
    fake = FakeDecoder()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def gateway(
    fake_decoder: FakeDecoder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = _start_gateway(
        tmp_path_factory.mktemp("gw"),
        fake_decoder.port,
        "--reasoning-parser",
        "glm45",
        "--tool-call-parser",
        "glm45",
        "--max-payload-bytes",
        str(2 * 1024 * 1024),
    )
    yield gw
    _stop(gw)


@pytest.fixture(scope="session")
def gateway_auth(
    fake_decoder: FakeDecoder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = _start_gateway(
        tmp_path_factory.mktemp("gw_auth"), fake_decoder.port, env={"GLIMPSE_API_KEY": API_KEY}
    )
    yield gw
    _stop(gw)


@pytest.fixture(scope="session")
def gateway_down(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = _start_gateway(
        tmp_path_factory.mktemp("gw_down"),
        free_port(),
        "--served-model-name",
        "some-model",
        "--decoder-wait-timeout",
        "1",
    )
    yield gw
    _stop(gw)
