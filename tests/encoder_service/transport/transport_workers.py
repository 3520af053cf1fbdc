"""Producer processes for the transport tests (imported by spawned children, not collected).

``ExporterProcess`` runs an ``EmbeddingExporter`` in a separate process driven over a pipe; its
clock is fake so tests move time forward instead of sleeping. ``GrpcExporterServer`` runs one
behind a real ``grpc.aio`` server on 127.0.0.1 with a generic (proto-less) service whose
``Fetch`` is a server-streaming method, plus two faulty variants that cut the stream.

Embeddings are drawn from a seeded generator on CPU (``seeded_embedding``), so the test process
computes the expected bytes on its own instead of trusting anything the producer reports.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import signal
import struct
import time
from typing import Any

import grpc
import torch

from encoder_service.transport import (
    EmbeddingChunk,
    EmbeddingExporter,
    ExporterConfig,
    TransportError,
    grpc_message_options,
    grpc_status,
)

SERVICE = "glimpse.test.Transport"
_HEADER = struct.Struct("<QQIB")  # offset, total_bytes, crc32c, has_crc


def seeded_embedding(rows: int, hidden: int, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, hidden, generator=g).to(torch.bfloat16).to(device)


def encode_chunk(c: EmbeddingChunk) -> bytes:
    crc = c.crc32c if c.crc32c is not None else 0
    return _HEADER.pack(c.offset, c.total_bytes, crc, c.crc32c is not None) + c.data


def decode_chunk(b: bytes) -> EmbeddingChunk:
    offset, total, crc, has_crc = _HEADER.unpack_from(b)
    data = b[_HEADER.size :]
    return EmbeddingChunk(offset, data, total, crc32c=crc if has_crc else None)


class _FakeClock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


# -- exporter over a pipe -------------------------------------------------------------------


def _exporter_loop(conn: Any, config: dict, device: str) -> None:
    clock = _FakeClock()
    exporter = EmbeddingExporter(ExporterConfig(**config), device=device, clock=clock)
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "put":
                rows, hidden, seed, consumers = args
                loc = exporter.put(seeded_embedding(rows, hidden, seed, device), consumers)
                conn.send(("ok", loc.to_dict()))
            elif cmd == "ack":
                conn.send(("ok", tuple(exporter.ack(args[0], args[1]))))
            elif cmd == "stream":
                chunks = list(exporter.stream_chunks(args[0], args[1]))
                conn.send(("ok", chunks))
            elif cmd == "sweep":
                conn.send(("ok", exporter.sweep_expired()))
            elif cmd == "advance":
                clock.offset += args[0]
                conn.send(("ok", None))
            elif cmd == "stats":
                s = exporter.stats
                conn.send(("ok", {"pool_fallbacks": s.pool_fallbacks, "puts": dict(s.puts)}))
            elif cmd == "exit":
                exporter.close()
                conn.send(("ok", None))
                return
        except TransportError as e:
            conn.send(("error", e.status_name, str(e)))


class ExporterProcess:
    """A child process owning an exporter; ``call`` waits a bounded time for each reply."""

    def __init__(self, config: dict, device: str = "cpu") -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_exporter_loop, args=(child, config, device))
        self.process.start()

    def call(self, *cmd: Any, timeout: float = 60.0) -> Any:
        self._conn.send(cmd)
        if not self._conn.poll(timeout):
            raise TimeoutError(f"exporter process did not answer {cmd[0]!r}")
        reply = self._conn.recv()
        if reply[0] == "error":
            raise RuntimeError(f"{reply[1]}: {reply[2]}")
        return reply[1]

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.call("exit", timeout=10)
            except (TimeoutError, OSError, EOFError):
                pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)


# -- exporter behind grpc -------------------------------------------------------------------


async def _serve(port_queue: Any, config: dict) -> None:
    clock = _FakeClock()
    exporter = EmbeddingExporter(ExporterConfig(**config), clock=clock)

    async def put(req: dict, context: Any) -> dict:
        t = seeded_embedding(req["rows"], req["hidden"], req["seed"])
        return exporter.put(t, req.get("consumers", 1)).to_dict()

    async def ack(req: dict, context: Any) -> dict:
        outcome = exporter.ack(req["embedding_id"], req.get("consumer"))
        return {"known": outcome.known, "released": outcome.released}

    async def advance(req: dict, context: Any) -> dict:
        clock.offset += req["seconds"]
        return {}

    async def fetch(req: dict, context: Any):
        try:
            for chunk in exporter.stream_chunks(req["embedding_id"], req.get("chunk_bytes")):
                yield chunk
        except TransportError as e:
            await context.abort(grpc_status(e), str(e))

    async def fetch_cut(req: dict, context: Any):
        # Faulty producer: ends the stream cleanly after half of the chunks.
        chunks = list(exporter.stream_chunks(req["embedding_id"], req.get("chunk_bytes")))
        for chunk in chunks[: len(chunks) // 2]:
            yield chunk

    async def fetch_abort(req: dict, context: Any):
        # Faulty producer: fails the call after half of the chunks (a dying connection).
        chunks = list(exporter.stream_chunks(req["embedding_id"], req.get("chunk_bytes")))
        for chunk in chunks[: len(chunks) // 2]:
            yield chunk
        await context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset")

    def js(fn: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=json.loads,
            response_serializer=lambda d: json.dumps(d).encode(),
        )

    def stream(fn: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_stream_rpc_method_handler(
            fn, request_deserializer=json.loads, response_serializer=encode_chunk
        )

    handlers = {
        "Put": js(put),
        "Ack": js(ack),
        "Advance": js(advance),
        "Fetch": stream(fetch),
        "FetchCut": stream(fetch_cut),
        "FetchAbort": stream(fetch_abort),
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
    exporter.close()


def _serve_main(port_queue: Any, config: dict) -> None:
    asyncio.run(_serve(port_queue, config))


class GrpcExporterServer:
    """A child process serving an exporter over gRPC; ``target`` is its address."""

    def __init__(self, config: dict) -> None:
        ctx = mp.get_context("spawn")
        ports = ctx.Queue()
        self.process = ctx.Process(target=_serve_main, args=(ports, config), daemon=True)
        self.process.start()
        self.target = f"127.0.0.1:{ports.get(timeout=60)}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)


class GrpcClient:
    """Test-side stub for the generic service (one channel, created inside the event loop)."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target, options=grpc_message_options())

    def _unary(self, name: str):
        return self.channel.unary_unary(
            f"/{SERVICE}/{name}",
            request_serializer=lambda d: json.dumps(d).encode(),
            response_deserializer=json.loads,
        )

    async def put(self, rows: int, hidden: int, seed: int, consumers: int = 1) -> dict:
        req = {"rows": rows, "hidden": hidden, "seed": seed, "consumers": consumers}
        return await self._unary("Put")(req, timeout=30)

    async def ack(self, embedding_id: str, consumer: str | None = None) -> dict:
        return await self._unary("Ack")({"embedding_id": embedding_id, "consumer": consumer})

    async def advance(self, seconds: float) -> None:
        await self._unary("Advance")({"seconds": seconds}, timeout=30)

    def fetch_fn(self, method: str = "Fetch", chunk_bytes: int | None = None):
        call = self.channel.unary_stream(
            f"/{SERVICE}/{method}",
            request_serializer=lambda d: json.dumps(d).encode(),
            response_deserializer=decode_chunk,
        )
        return lambda loc: call(
            {"embedding_id": loc.embedding_id, "chunk_bytes": chunk_bytes}, timeout=30
        )

    async def close(self) -> None:
        await self.channel.close()
