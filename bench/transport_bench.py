"""Micro-benchmark of the embedding transport paths (not a test).

Moves one embedding of ``--rows`` x ``--hidden`` bf16 (default 1600 x 4096: one 1120x1120 image,
12.5 MiB) from a producer process to this process through every path available here:

    shm                CPU producer -> CPU consumer, POSIX shared memory
    grpc_stream        CPU producer -> CPU consumer, a real grpc.aio server on 127.0.0.1
    cuda_ipc           GPU producer -> GPU consumer, the producer's pool opened once by IPC
    grpc_stream(cuda)  GPU producer -> GPU consumer forced through the stream (the cross-host cost)

The timed region is ``EmbeddingImporter.fetch`` (descriptor in hand -> tensor on the consumer's
device, synchronized); the producer's put and the ack are outside it. The handoff column times
the whole exchange a decoder sees: the Put RPC that returns the descriptor (the producer copies
the embedding into its pool inside it), the fetch, and the Ack RPC. Prints a table and writes
JSON (``--json``). Run: ``python -m bench.transport_bench [--iters 30] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import signal
import statistics
import sys
import time
from typing import Any

import grpc
import torch

from encoder_service.convert import chunk_from_message, chunk_message
from encoder_service.transport import (
    EmbeddingChunk,
    EmbeddingExporter,
    EmbeddingImporter,
    EmbeddingLocation,
    ExporterConfig,
    ImporterConfig,
    TransportError,
    grpc_message_options,
    grpc_status,
)
from protos import encoder_pb2 as pb

SERVICE = "glimpse.bench.Transport"


def _encode_chunk(c: EmbeddingChunk) -> bytes:  # the encoder's own wire message
    return chunk_message(c).SerializeToString()


def _decode_chunk(b: bytes) -> EmbeddingChunk:
    return chunk_from_message(pb.EmbeddingChunk.FromString(b))


def _js(d: Any) -> bytes:
    return json.dumps(d).encode()


# -- producer process -----------------------------------------------------------------------


async def _produce(port_queue: Any, rows: int, hidden: int, pool_bytes: int) -> None:
    exporters = {"cpu": EmbeddingExporter(ExporterConfig(pool_bytes=pool_bytes), device="cpu")}
    if torch.cuda.is_available():
        exporters["cuda"] = EmbeddingExporter(ExporterConfig(pool_bytes=pool_bytes), device="cuda")
    g = torch.Generator().manual_seed(0)
    source = torch.randn(rows, hidden, generator=g).to(torch.bfloat16)
    tensors = {name: source.to(e.device) for name, e in exporters.items()}

    async def put(req: dict, context: Any) -> dict:
        return exporters[req["device"]].put(tensors[req["device"]]).to_dict()

    async def ack(req: dict, context: Any) -> dict:
        return {"released": exporters[req["device"]].ack(req["embedding_id"]).released}

    async def fetch(req: dict, context: Any):
        try:
            for chunk in exporters[req["device"]].stream_chunks(req["embedding_id"]):
                yield chunk
        except TransportError as e:
            await context.abort(grpc_status(e), str(e))

    unary = {"request_deserializer": json.loads, "response_serializer": _js}
    handlers = {
        "Put": grpc.unary_unary_rpc_method_handler(put, **unary),
        "Ack": grpc.unary_unary_rpc_method_handler(ack, **unary),
        "Fetch": grpc.unary_stream_rpc_method_handler(
            fetch, request_deserializer=json.loads, response_serializer=_encode_chunk
        ),
    }
    server = grpc.aio.server(options=grpc_message_options())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_queue.put(port)
    # Close the pool on SIGTERM so its shared memory is unlinked by its owner.
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(None)
    for e in exporters.values():
        e.close()


def _producer_main(port_queue: Any, rows: int, hidden: int, pool_bytes: int) -> None:
    asyncio.run(_produce(port_queue, rows, hidden, pool_bytes))


# -- consumer (this process) ----------------------------------------------------------------


async def _bench_path(
    target: str, device: str, producer_device: str, force: str | None, iters: int, warmup: int
) -> dict:
    channel = grpc.aio.insecure_channel(target, options=grpc_message_options())
    put = channel.unary_unary(
        f"/{SERVICE}/Put", request_serializer=_js, response_deserializer=json.loads
    )
    ack = channel.unary_unary(
        f"/{SERVICE}/Ack", request_serializer=_js, response_deserializer=json.loads
    )
    stream = channel.unary_stream(
        f"/{SERVICE}/Fetch", request_serializer=_js, response_deserializer=_decode_chunk
    )

    def fetch_fn(loc: EmbeddingLocation):
        return stream({"device": producer_device, "embedding_id": loc.embedding_id}, timeout=60)

    importer = EmbeddingImporter(ImporterConfig(device=device, force_path=force))
    times: list[float] = []
    handoffs: list[float] = []  # descriptor RPC + fetch + ack, the whole handoff
    path_used = ""
    try:
        for i in range(warmup + iters):
            put_start = time.perf_counter()
            loc = EmbeddingLocation.from_dict(await put({"device": producer_device}, timeout=60))
            before = dict(importer.stats.fetches)
            start = time.perf_counter()
            out = await importer.fetch(loc, fetch_fn)
            if out.is_cuda:
                torch.cuda.synchronize(out.device)
            elapsed = time.perf_counter() - start
            path_used = next(p for p, n in importer.stats.fetches.items() if n > before.get(p, 0))
            await ack({"device": producer_device, "embedding_id": loc.embedding_id}, timeout=60)
            if i >= warmup:
                times.append(elapsed)
                handoffs.append(time.perf_counter() - put_start)
        nbytes = loc.nbytes
    finally:
        importer.close()
        await channel.close()
    times.sort()
    p50 = statistics.median(times)
    return {
        "path": path_used,
        "device": device,
        "nbytes": nbytes,
        "iters": iters,
        "p50_ms": p50 * 1e3,
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))] * 1e3,
        "mean_ms": statistics.fmean(times) * 1e3,
        "gbps_p50": nbytes / p50 / 1e9,
        "handoff_p50_ms": statistics.median(handoffs) * 1e3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1600)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pool-mb", type=int, default=256)
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)

    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    producer = ctx.Process(
        target=_producer_main,
        args=(ports, args.rows, args.hidden, args.pool_mb << 20),
        daemon=True,
    )
    producer.start()
    try:
        target = f"127.0.0.1:{ports.get(timeout=120)}"
        cases = [("cpu", "cpu", None), ("cpu", "cpu", "grpc_stream")]
        if torch.cuda.is_available():
            cases += [("cuda", "cuda", None), ("cuda", "cuda", "grpc_stream")]
        results = []
        for device, producer_device, force in cases:
            r = asyncio.run(
                _bench_path(target, device, producer_device, force, args.iters, args.warmup)
            )
            results.append(r)
    finally:
        producer.terminate()
        producer.join(timeout=10)

    mib = args.rows * args.hidden * 2 / (1 << 20)
    print(f"embedding {args.rows}x{args.hidden} bf16 ({mib:.1f} MiB), {args.iters} iterations")
    print(
        f"{'path':<18}{'device':<8}{'p50 ms':>10}{'p90 ms':>10}{'mean ms':>10}{'GB/s':>9}"
        f"{'handoff p50 ms':>16}"
    )
    for r in results:
        name = r["path"] + (
            "(cuda)" if r["path"] == "grpc_stream" and r["device"] == "cuda" else ""
        )
        print(
            f"{name:<18}{r['device']:<8}{r['p50_ms']:>10.3f}{r['p90_ms']:>10.3f}"
            f"{r['mean_ms']:>10.3f}{r['gbps_p50']:>9.2f}{r['handoff_p50_ms']:>16.3f}"
        )
    report = {
        "rows": args.rows,
        "hidden": args.hidden,
        "dtype": "bfloat16",
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "results": results,
    }
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
