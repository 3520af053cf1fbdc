"""Request heads larger than ``--max-header-bytes`` get 431 with an OpenAI error body.

Two ways a head can be too large, both driven over a raw socket so the bytes on the wire are
exactly the test's: a head that arrives complete (parsed, then refused by the application) and
one still incomplete when the cap is reached (refused by the HTTP protocol before any parsing).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.gateway.fake_decoder import FakeDecoder
from tests.gateway.gateway_process import Gateway, start_gateway, stop_gateway

CAP = 8192


@pytest.fixture(scope="module")
def small_head_gateway(
    fake_decoder: FakeDecoder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = start_gateway(
        tmp_path_factory.mktemp("gw-head"), fake_decoder.port, "--max-header-bytes", str(CAP)
    )
    yield gw
    stop_gateway(gw)


def exchange(gw: Gateway, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw``, read until the server closes (bounded); (status, headers, body)."""
    parts = urlsplit(gw.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(raw)
        data = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, body


def request_head(filler: int, complete: bool = True) -> bytes:
    head = (
        f"GET /health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nX-Filler: {'h' * filler}\r\n"
    ).encode()
    return head + b"\r\n" if complete else head


def assert_431(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 431, body
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "request_header_fields_too_large"
    assert "header" in error["message"]


def test_head_under_the_cap_is_served(small_head_gateway):
    status, _, _ = exchange(small_head_gateway, request_head(CAP // 2))
    assert status == 200


def test_complete_head_over_the_cap_gets_431(small_head_gateway):
    assert_431(*exchange(small_head_gateway, request_head(2 * CAP)))


def test_incomplete_head_past_the_cap_gets_431(small_head_gateway):
    # the blank line never comes: the server must stop buffering at the cap and answer
    assert_431(*exchange(small_head_gateway, request_head(4 * CAP, complete=False)))
    status, _, _ = exchange(small_head_gateway, request_head(16))
    assert status == 200  # and it keeps serving
