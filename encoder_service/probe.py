"""Health probe for container healthchecks: ``python -m encoder_service.probe --port P``.

Contract: calls ``grpc.health.v1.Health/Check`` on HOST:PORT for SERVICE (default ``""``, the
whole server) and exits 0 when the answer is SERVING, 1 otherwise (NOT_SERVING, unreachable,
timeout, unknown service). Imports grpc only: no torch, so it starts fast.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(host: str, port: int, service: str = "", timeout_s: float = 3.0) -> str:
    """The server's status name (``SERVING``, ``NOT_SERVING``, ...) or the gRPC error code."""
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as err:
            return err.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--service", default="", help="service name ('' = the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    status = check(args.host, args.port, args.service, args.timeout)
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
