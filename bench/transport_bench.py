"""Micro-benchmark of the embedding transport paths (not a test).

Moves one embedding of ``--rows`` x ``--hidden`` bf16 (default 1600 x 4096: one 1120x1120 image,
12.5 MiB) from a producer process to this process through every path available here:

    shm                CPU producer -> CPU consumer, POSIX shared memory
    grpc_stream        CPU producer -> CPU consumer, a real grpc.aio server on 127.0.0.1
    cuda_ipc           GPU producer -> GPU consumer, the producer's pool opened once by IPC
    grpc_stream(cuda)  GPU producer -> GPU consumer forced through the stream (the cross-host cost)

The producer runs the encoder's own servicer (``EncoderServicer``: ``Encode``, ``FetchEmbedding``,
``Ack``, registered by ``add_encoder_servicer`` as the encoder server does) over an
``EmbeddingStore``, with the server's message options; only the pipeline is a stand-in that
returns a fixed tensor without the vision tower (``Encode`` still copies it into the pool). The
consumer is the decoder's own ``EncoderClient``. ``--producer-env K=V`` sets environment
variables (e.g. glibc malloc tunables) for the producer process only. Columns, all p50 except
where named:

    fetch ms / GB/s    ``EncoderClient.fetch``: descriptor in hand -> tensor on the consumer's
                       device (synchronized); p90 and mean beside it
    rpc ms             an empty unary call on the same channel options: the gRPC round-trip floor
    encode ms          the ``Encode`` call that returns the descriptor (including the producer's
                       copy into its pool)
    handoff ms         what a decoder waits for: ``encode`` + ``fetch``. The ack is queued by
                       ``fetch(ack=True)`` and not awaited, as in the decoder.
    ack ms             how long after the handoff the queued ack was answered. The bench waits
                       for it before the next iteration (outside every timed region), so each
                       put finds the previous slot freed, as a decoder's steady state would.
    cpu ms             CPU time of both processes (all threads) per iteration (encode, fetch,
                       ack), mean: steadier than wall time on a small or shared host (Linux only)

Prints a table and writes JSON (``--json``).
Run: ``python -m bench.transport_bench [--iters 30] [--chunk-mb 1] [--paths pool,grpc_stream]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
from typing import Any

import grpc
import torch

from encoder_service.client import EncoderClient, channel_options
from encoder_service.config import MIB, EncoderConfig, ServerLimits
from encoder_service.items import EncodedItem, MediaItem, Modality
from encoder_service.metrics import EncoderMetrics
from encoder_service.server import message_options
from encoder_service.servicer import EncoderServicer, add_encoder_servicer
from encoder_service.store import EmbeddingStore
from encoder_service.transport import EmbeddingImporter, ExporterConfig, ImporterConfig

EMPTY_METHOD = "/glimpse.bench.Transport/Empty"
_ITEM = MediaItem(index=0, modality=Modality.IMAGE, data=b"bench")  # Encode ignores it
# --paths names -> the importer's force_path: "pool" is the same-host path (shm or cuda_ipc).
_PATH_KINDS = {"pool": None, "grpc_stream": "grpc_stream"}


# -- producer process -----------------------------------------------------------------------


class _FixedPipeline:
    """Stands in for ``EncodePipeline``: every Encode yields the same tensor, no vision tower."""

    def __init__(self, tensor: torch.Tensor) -> None:  # [rows, hidden] bf16 on the store's device
        t, h, w = 1, 2 * tensor.shape[0], 2
        self._item = EncodedItem("bench", Modality.IMAGE, tensor, (t, h, w), (), False)

    async def encode(self, items: list[MediaItem], budget_s: float) -> list[EncodedItem]:
        return [self._item] * len(items)


async def _empty(request: bytes, context: Any) -> bytes:
    return b""


async def _produce(port_queue: Any, rows: int, hidden: int, pool_bytes: int) -> None:
    g = torch.Generator().manual_seed(0)
    source = torch.randn(rows, hidden, generator=g).to(torch.bfloat16)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    config = EncoderConfig()
    stores, servers, ports = [], [], {}
    for device in devices:  # one server per device: Encode has no device field
        # the encoder server's default chunk, which a client asking for 0 gets
        exporter_config = ExporterConfig(pool_bytes, chunk_bytes=config.server.stream_chunk_bytes)
        store = EmbeddingStore(exporter_config, config.store.embedding_store_mb * MIB, device)
        pipeline = _FixedPipeline(source.to(store.exporter.device))
        servicer = EncoderServicer(config, store, EncoderMetrics(), lambda p=pipeline: p)
        server = grpc.aio.server(options=message_options(ServerLimits()))
        add_encoder_servicer(servicer, server)
        empty = {"Empty": grpc.unary_unary_rpc_method_handler(_empty)}
        generic = grpc.method_handlers_generic_handler("glimpse.bench.Transport", empty)
        server.add_generic_rpc_handlers((generic,))
        ports[device] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        stores.append(store)
        servers.append(server)
    port_queue.put(ports)
    # Close the pools on SIGTERM so their shared memory is unlinked by its owner.
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for server in servers:
        await server.stop(None)
    for store in stores:
        store.close()


def _producer_main(port_queue: Any, rows: int, hidden: int, pool_bytes: int) -> None:
    asyncio.run(_produce(port_queue, rows, hidden, pool_bytes))


def _start_producer(ctx: Any, ports: Any, args: argparse.Namespace, env: dict[str, str]) -> Any:
    """Spawn the producer with ``env`` added to its environment (read by glibc at its start)."""
    producer = ctx.Process(
        target=_producer_main,
        args=(ports, args.rows, args.hidden, args.pool_mb << 20),
        daemon=True,
    )
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        producer.start()  # a spawned child inherits this process's environment
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return producer


# -- consumer (this process) ----------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all threads (NaN without /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _p50_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


async def _rpc_floor(target: str, iters: int) -> float:
    """p50 of an empty unary call on a channel with the client's options."""
    async with grpc.aio.insecure_channel(target, options=channel_options(0)) as channel:
        call = channel.unary_unary(EMPTY_METHOD)
        times = []
        for i in range(iters + 10):
            start = time.perf_counter()
            await call(b"", timeout=60)
            if i >= 10:
                times.append(time.perf_counter() - start)
    return _p50_ms(times)


async def _bench_path(
    target: str,
    producer_pid: int,
    device: str,
    force: str | None,
    chunk_bytes: int,
    iters: int,
    warmup: int,
) -> dict:
    importer = EmbeddingImporter(ImporterConfig(device=device, force_path=force))
    fetches: list[float] = []
    encodes: list[float] = []
    handoffs: list[float] = []
    acks: list[float] = []
    path_used = ""
    async with EncoderClient(target, importer=importer) as client:
        for i in range(warmup + iters):
            if i == warmup:
                cpu_start = _cpu_s(os.getpid()) + _cpu_s(producer_pid)
            start = time.perf_counter()
            [desc] = await client.encode([_ITEM], timeout=60)
            fetch_start = time.perf_counter()
            before = dict(importer.stats.fetches)
            out = await client.fetch(desc, chunk_bytes, timeout=60, ack=True)
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            done = time.perf_counter()
            await client.drain_acks()  # outside the handoff: the decoder does not wait for it
            acked = time.perf_counter()
            path_used = next(p for p, n in importer.stats.fetches.items() if n > before.get(p, 0))
            if i >= warmup:
                encodes.append(fetch_start - start)
                fetches.append(done - fetch_start)
                handoffs.append(done - start)
                acks.append(acked - done)
        cpu = _cpu_s(os.getpid()) + _cpu_s(producer_pid) - cpu_start
        assert client.acks_failed == 0, "an ack failed: the producer's pool would fill up"
    importer.close()
    nbytes = desc.nbytes
    fetches.sort()
    p50 = statistics.median(fetches)
    return {
        "path": path_used,
        "device": device,
        "nbytes": nbytes,
        "iters": iters,
        "chunk_bytes": chunk_bytes,
        "p50_ms": p50 * 1e3,
        "p90_ms": fetches[min(len(fetches) - 1, int(0.9 * len(fetches)))] * 1e3,
        "mean_ms": statistics.fmean(fetches) * 1e3,
        "gbps_p50": nbytes / p50 / 1e9,
        "rpc_floor_p50_ms": await _rpc_floor(target, iters),
        "encode_p50_ms": _p50_ms(encodes),
        "handoff_p50_ms": _p50_ms(handoffs),
        "ack_p50_ms": _p50_ms(acks),
        "cpu_ms_per_iter": cpu / iters * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1600)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pool-mb", type=int, default=256)
    parser.add_argument(
        "--chunk-mb",
        type=float,
        default=0,
        help="stream chunk the client asks for; 0 = the encoder server's default",
    )
    parser.add_argument(
        "--paths", default="", help="comma-separated subset of: pool,grpc_stream (empty = all)"
    )
    parser.add_argument(
        "--producer-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the producer process only (repeatable)",
    )
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    chunk_bytes = int(args.chunk_mb * (1 << 20))
    wanted = {p for p in args.paths.split(",") if p}
    if wanted - set(_PATH_KINDS):
        parser.error(f"--paths takes {sorted(_PATH_KINDS)}, not {sorted(wanted)}")

    if any("=" not in kv for kv in args.producer_env):
        parser.error("--producer-env takes KEY=VALUE")
    producer_env = dict(kv.split("=", 1) for kv in args.producer_env)

    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    producer = _start_producer(ctx, ports, args, producer_env)
    try:
        targets = {dev: f"127.0.0.1:{port}" for dev, port in ports.get(timeout=120).items()}
        cases = [("cpu", None), ("cpu", "grpc_stream")]
        if torch.cuda.is_available():
            cases += [("cuda", None), ("cuda", "grpc_stream")]
        if wanted:
            cases = [c for c in cases if any(_PATH_KINDS[w] == c[1] for w in wanted)]
        results = []
        for device, force in cases:
            run = _bench_path(
                targets[device], producer.pid, device, force, chunk_bytes, args.iters, args.warmup
            )
            r = asyncio.run(run)
            results.append(r)
    finally:
        producer.terminate()
        producer.join(timeout=10)

    mib = args.rows * args.hidden * 2 / (1 << 20)
    print(f"embedding {args.rows}x{args.hidden} bf16 ({mib:.1f} MiB), {args.iters} iterations")
    print("fetch = descriptor -> tensor; handoff = encode + fetch (ack queued, not awaited)")
    print(
        f"{'path':<18}{'device':<8}{'fetch ms':>10}{'p90 ms':>9}{'mean ms':>9}{'GB/s':>7}"
        f"{'rpc ms':>8}{'encode ms':>11}{'handoff ms':>12}{'ack ms':>8}{'cpu ms':>8}"
    )
    for r in results:
        name = r["path"] + (
            "(cuda)" if r["path"] == "grpc_stream" and r["device"] == "cuda" else ""
        )
        print(
            f"{name:<18}{r['device']:<8}{r['p50_ms']:>10.3f}{r['p90_ms']:>9.3f}"
            f"{r['mean_ms']:>9.3f}{r['gbps_p50']:>7.2f}{r['rpc_floor_p50_ms']:>8.3f}"
            f"{r['encode_p50_ms']:>11.3f}{r['handoff_p50_ms']:>12.3f}{r['ack_p50_ms']:>8.3f}"
            f"{r['cpu_ms_per_iter']:>8.1f}"
        )
    report = {
        "rows": args.rows,
        "hidden": args.hidden,
        "dtype": "bfloat16",
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "producer_env": producer_env,
        "results": results,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
