"""``glimpse serve``: one encoder, the decoder and the gateway as local processes, in one command.

Contract: ``run(args)`` starts ``glimpse encoder``, ``glimpse decoder`` and ``glimpse gateway`` as
subprocesses of this interpreter (internal gRPC services on 127.0.0.1 at free ports, the
gateway's reasoning and tool-call parsers set to glm45), waits with a bounded timeout until the
encoder and decoder report SERVING over grpc.health.v1 and the gateway's /health answers 200,
prints the URL, and then watches them: on Ctrl-C or SIGTERM, or when any of them exits, it stops
the gateway, the decoder and the encoder in that order (SIGTERM, then SIGKILL after a grace) and
returns. Without ``--model-path`` it serves the embedded default model
(``models/glm4v/demo/checkpoint``) when that directory holds a ``model.safetensors``; otherwise a
tiny random checkpoint written once into the user's cache directory.
Not here: anything a service does itself (each one has its own subcommand and flags).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from encoder_service.probe import check as grpc_health

DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "models" / "glm4v" / "demo" / "checkpoint"
DECODER_SERVICE = "glimpse.decoder.v1.Decoder"
ENCODER_SERVICE = "glimpse.encoder.v1.Encoder"
_STOP_GRACE_S = 30.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-path",
        default=None,
        help="checkpoint directory (default: the embedded demo model, else a tiny random one)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="gateway address (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8000, help="gateway port")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--api-key", default=None, help="require this bearer token on /v1")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--limit-mm-per-prompt", default=None, help="e.g. image=4,video=1")
    parser.add_argument(
        "--allowed-local-media-path", default=None, help="directory file:// URLs may read"
    )
    parser.add_argument("--decoder-port", type=int, default=0, help="decoder gRPC (0: any free)")
    parser.add_argument("--encoder-port", type=int, default=0, help="encoder gRPC (0: any free)")
    parser.add_argument("--decoder-metrics-port", type=int, default=0, help="0: no metrics")
    parser.add_argument("--encoder-metrics-port", type=int, default=0, help="0: no metrics")
    for name in ("encoder", "decoder", "gateway"):
        parser.add_argument(
            f"--{name}-args", default="", help=f"extra flags for `glimpse {name}` (one string)"
        )
    parser.add_argument(
        "--startup-timeout", type=float, default=900.0, help="seconds to wait for readiness"
    )
    parser.add_argument(
        "--log-dir", type=Path, default=None, help="write each service's log here (default: tty)"
    )


@dataclass
class Service:
    name: str
    argv: list[str]
    ready: Callable[[], bool]
    process: subprocess.Popen | None = None
    log: Path | None = None


def default_model_path() -> tuple[Path, str]:
    """The embedded demo checkpoint if present, else a tiny one in the cache (written once)."""
    if (DEMO_CHECKPOINT / "model.safetensors").is_file():
        return DEMO_CHECKPOINT, "glimpse-demo"
    from models.glm4v.tiny import write_tiny_checkpoint

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "glimpse"
    target = cache / "tiny-glm4.5v-seed0"
    if not (target / "model.safetensors").is_file():
        print(f"glimpse serve: no embedded model; writing a tiny checkpoint to {target}")
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="tiny-", dir=cache))
        write_tiny_checkpoint(staging, seed=0, variant="glm4.5v")
        try:
            staging.rename(target)
        except OSError:  # another process finished first; keep theirs
            pass
    return target, "glimpse-tiny"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_services(args: argparse.Namespace, model: Path, name: str | None) -> list[Service]:
    py = [sys.executable, "-m", "glimpse.cli"]
    enc_port, dec_port = args.encoder_port or free_port(), args.decoder_port or free_port()
    common = ["--model-path", str(model), "--host", "127.0.0.1", "--device", args.device]
    common += ["--dtype", args.dtype, "--shutdown-drain-s", "0", "--shutdown-grace-s", "5"]
    encoder = [*py, "encoder", *common, "--port", str(enc_port)]
    if args.allowed_local_media_path:
        encoder += ["--allowed-local-media-path", args.allowed_local_media_path]
    if args.encoder_metrics_port:
        encoder += ["--enable-metrics", "--metrics-port", str(args.encoder_metrics_port)]
    decoder = [*py, "decoder", *common, "--port", str(dec_port)]
    decoder += ["--encoder-urls", f"127.0.0.1:{enc_port}"]
    if name:
        decoder += ["--served-model-name", name]
    if args.max_model_len:
        decoder += ["--max-model-len", str(args.max_model_len)]
    if args.limit_mm_per_prompt:
        decoder += ["--limit-mm-per-prompt", args.limit_mm_per_prompt]
    if args.decoder_metrics_port:
        decoder += ["--enable-metrics", "--metrics-port", str(args.decoder_metrics_port)]
    gateway = [*py, "gateway", "--decoder-url", f"127.0.0.1:{dec_port}"]
    gateway += ["--host", args.host, "--port", str(args.port)]
    gateway += ["--reasoning-parser", "glm45", "--tool-call-parser", "glm45"]
    if args.api_key:
        gateway += ["--api-key", args.api_key]
    url_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    health_url = f"http://{url_host}:{args.port}/health"
    return [
        Service(
            "encoder",
            encoder + shlex.split(args.encoder_args),
            lambda: grpc_health("127.0.0.1", enc_port, ENCODER_SERVICE, 2.0) == "SERVING",
        ),
        Service(
            "decoder",
            decoder + shlex.split(args.decoder_args),
            lambda: grpc_health("127.0.0.1", dec_port, DECODER_SERVICE, 2.0) == "SERVING",
        ),
        Service("gateway", gateway + shlex.split(args.gateway_args), lambda: _http_ok(health_url)),
    ]


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def start(service: Service, log_dir: Path | None) -> None:
    out = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        service.log = log_dir / f"{service.name}.log"
        out = open(service.log, "ab")  # noqa: SIM115 - the child keeps it open
    # NOTE: own sessions, so a terminal's Ctrl-C reaches only us and we stop them in order.
    service.process = subprocess.Popen(
        service.argv,
        stdout=out,
        stderr=subprocess.STDOUT if out else None,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    if out is not None:
        out.close()


def _die_with_parent() -> None:
    # Runs in the child before exec: if `glimpse serve` itself is killed (SIGKILL, OOM), the
    # kernel sends the child SIGTERM instead of leaving it running without a supervisor.
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def stop_all(services: list[Service]) -> None:
    for service in reversed(services):  # gateway first: no new requests reach the others
        proc = service.process
        if proc is None or proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _exited(services: list[Service]) -> Service | None:
    return next((s for s in services if s.process and s.process.poll() is not None), None)


def run(args: argparse.Namespace) -> int:
    name = args.served_model_name
    if args.model_path is None:
        model, default_name = default_model_path()
        name = name or default_name
    else:
        model = Path(args.model_path)
        if not (model / "config.json").is_file():
            print(f"glimpse serve: {model} is not a checkpoint directory", file=sys.stderr)
            return 2
    services = build_services(args, model, name)
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        for service in services:
            start(service, args.log_dir)
        status = _wait_ready(services, stop, args.startup_timeout)
        if status != 0:
            return status
        print(f"Glimpse is serving {model} at http://{args.host}:{args.port}/v1", flush=True)
        while not stop.wait(0.5):
            dead = _exited(services)
            if dead is not None:
                print(f"glimpse serve: the {dead.name} exited; stopping", file=sys.stderr)
                return 1
        return 0
    finally:
        stop_all(services)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_ready(services: list[Service], stop: threading.Event, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    pending = list(services)
    while pending:
        if stop.is_set():
            return 130
        dead = _exited(services)
        if dead is not None:
            where = f" (log: {dead.log})" if dead.log else ""
            print(f"glimpse serve: the {dead.name} failed to start{where}", file=sys.stderr)
            return 1
        if time.monotonic() > deadline:
            names = ", ".join(s.name for s in pending)
            print(f"glimpse serve: not ready after {timeout:.0f}s: {names}", file=sys.stderr)
            return 1
        pending = [s for s in pending if not s.ready()]
        if pending:
            stop.wait(0.25)
    return 0
