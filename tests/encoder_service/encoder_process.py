"""``glimpse encoder`` as a separate process for tests that need a real second process.

Contract: ``EncoderProcess.spawn(ckpt, *flags)`` starts the CLI on free loopback ports with
metrics enabled; ``wait_serving()`` polls its health (bounded) and fails with the process output
when it dies or never gets there. ``metric(name, labels)`` scrapes its Prometheus endpoint;
``wait_metric`` polls until a predicate holds (bounded). ``stop()`` sends SIGTERM and waits,
``kill()`` sends SIGKILL (an encoder dying without shutting down).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from encoder_service import probe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EncoderProcess:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    log: tempfile._TemporaryFileWrapper  # the process output (a file: a full pipe would block it)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def spawn(cls, ckpt: Path, *flags: str) -> EncoderProcess:
        port, metrics_port = free_port(), free_port()
        cmd = [
            sys.executable, "-m", "glimpse.cli", "encoder", "--model-path", str(ckpt),
            "--host", "127.0.0.1", "--port", str(port), "--enable-metrics",
            "--metrics-port", str(metrics_port), "--shutdown-grace-s", "2", *flags,
        ]  # fmt: skip
        log = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
        return cls(proc, port, metrics_port, log)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_serving(self, timeout_s: float = 120.0) -> EncoderProcess:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            if probe.check("127.0.0.1", self.port, timeout_s=1.0) == "SERVING":
                return self
            time.sleep(0.2)  # bounded poll of another process
        raise AssertionError(f"encoder never became SERVING: {self.output()}")

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_metric(
        self, name: str, ok: Callable[[float], bool], timeout_s: float = 30.0, **labels: str
    ) -> float:
        deadline = time.monotonic() + timeout_s
        value = self.metric(name, **labels)
        while not ok(value):
            assert time.monotonic() < deadline, f"{name}{labels} stayed at {value}"
            time.sleep(0.1)  # bounded poll of another process
            value = self.metric(name, **labels)
        return value

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(timeout=10)
        self.log.close()
        self.log.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.log.close()
