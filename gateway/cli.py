"""`glimpse gateway`: run the OpenAI-compatible REST gateway in front of a decoder service.

Flags mirror vLLM/SGLang spelling; every default comes from ``GatewayConfig``. The API key may
come from ``--api-key`` or the GLIMPSE_API_KEY environment variable (read in config.py only).
Request heads larger than ``--max-header-bytes`` get 431 with an OpenAI error body. uvicorn's
h11 protocol only notices an oversized head while it is still incomplete (its buffer passes
``h11_max_incomplete_event_size``) and then answers a plain-text 400 and closes; the protocol
subclass below answers that case with the 431 instead. A head that arrives complete in one read
is parsed whatever its size and refused by ``app.HeaderSizeLimit``. Either way the connection
may be reset while a client is still writing a very large head, so a client can see a reset
instead of the 431.
Not here: application wiring (app.py).
"""

from __future__ import annotations

import argparse
import json
import logging

from gateway.config import PARSERS, GatewayConfig

_D = GatewayConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--decoder-url", default=_D.decoder_url, help="decoder gRPC host:port")
    parser.add_argument("--host", default=_D.host)
    parser.add_argument("--port", type=int, default=_D.port)
    parser.add_argument(
        "--api-key",
        default=None,
        help="require `Authorization: Bearer KEY` on /v1 and /metrics (env GLIMPSE_API_KEY)",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="model name clients send (default: decoder's)"
    )
    parser.add_argument("--max-payload-bytes", type=int, default=_D.max_payload_bytes)
    parser.add_argument(
        "--max-header-bytes",
        type=int,
        default=_D.max_header_bytes,
        help="largest request head (request line + headers); larger ones get 431",
    )
    parser.add_argument(
        "--request-timeout", type=float, default=_D.request_timeout, help="seconds per generation"
    )
    parser.add_argument(
        "--decoder-wait-timeout",
        type=float,
        default=_D.decoder_wait_timeout,
        help="seconds to keep waiting for the decoder at startup",
    )
    parser.add_argument("--reasoning-parser", choices=PARSERS, default=_D.reasoning_parser)
    parser.add_argument("--tool-call-parser", choices=PARSERS, default=_D.tool_call_parser)
    parser.add_argument("--max-concurrent-requests", type=int, default=_D.max_concurrent_requests)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        decoder_url=args.decoder_url,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        max_payload_bytes=args.max_payload_bytes,
        max_header_bytes=args.max_header_bytes,
        request_timeout=args.request_timeout,
        decoder_wait_timeout=args.decoder_wait_timeout,
        reasoning_parser=args.reasoning_parser,
        tool_call_parser=args.tool_call_parser,
        max_concurrent_requests=args.max_concurrent_requests,
    ).from_env_defaults()


def header_limited_h11() -> type:
    """uvicorn's h11 protocol answering an over-long incomplete head with 431 instead of 400."""
    # imported here: the server stack loads only when the gateway actually runs
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from gateway.app import header_too_large

    class HeaderLimitedH11(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            buffered, _closed = self.conn.trailing_data
            limit = self.config.h11_max_incomplete_event_size
            if limit is None or len(buffered) <= limit:  # another malformed request: keep 400
                super().send_400_response(msg)
                return
            body = json.dumps(header_too_large().body()).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ]
            response = h11.Response(
                status_code=431, headers=headers, reason=b"Request Header Fields Too Large"
            )
            self.transport.write(self.conn.send(response))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
            self.transport.close()

    return HeaderLimitedH11


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app

    config = config_from_args(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level=args.log_level,
        http=header_limited_h11(),
        h11_max_incomplete_event_size=config.max_header_bytes,
        timeout_graceful_shutdown=30,
    )
    return 0
