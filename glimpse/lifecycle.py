"""Run a gRPC service process until SIGTERM/SIGINT: start, wait for readiness, drain, stop.

Contract: ``add_process_arguments`` declares the flags every service process shares (metrics,
shutdown timing, log level). ``serve_until_signal(server)`` takes any server with ``start()``, ``wait_ready()`` and
``stop(grace_s=None)`` coroutines (the encoder's and the decoder's). It returns 1 when loading
failed (the server is stopped at once), else 0 after a signal and a graceful stop (health
NOT_SERVING, in-flight calls drained). What the servers do is theirs; this is process plumbing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Protocol

log = logging.getLogger(__name__)


class Service(Protocol):
    async def start(self) -> object: ...
    async def wait_ready(self) -> None: ...
    async def stop(self, grace_s: float | None = None) -> None: ...


def add_process_arguments(
    group: argparse._ArgumentGroup, metrics_port: int, drain_s: float, grace_s: float
) -> None:
    """Flags every gRPC service process shares: metrics endpoint, shutdown timing, log level."""
    group.add_argument("--enable-metrics", action="store_true", help="serve Prometheus /metrics")
    group.add_argument("--metrics-port", type=int, default=metrics_port)
    group.add_argument(
        "--shutdown-drain-s",
        type=float,
        default=drain_s,
        help="seconds NOT_SERVING is visible before the server stops",
    )
    group.add_argument(
        "--shutdown-grace-s",
        type=float,
        default=grace_s,
        help="seconds in-flight calls get to finish on shutdown",
    )
    group.add_argument("--log-level", default="INFO")


async def serve_until_signal(server: Service) -> int:
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ready = asyncio.create_task(server.wait_ready())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        await server.stop(grace_s=0)
        stopped.cancel()
        return 1
    await stopped
    log.info("shutting down: health NOT_SERVING, draining in-flight calls")
    await server.stop()
    ready.cancel()
    return 0
