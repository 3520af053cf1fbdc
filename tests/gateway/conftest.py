"""Fixtures for gateway tests: a fake decoder in-process and real gateway processes on 127.0.0.1.

``fake_decoder`` (session): the scripted gRPC decoder of fake_decoder.py.
``gateway`` (session): `glimpse gateway` with both glm45 parsers, no API key.
``gateway_auth`` (session): no parsers, an API key from GLIMPSE_API_KEY, one request at a time.
``gateway_down`` (session): a gateway whose decoder address has nothing listening.
Each gateway is a subprocess (gateway_process.py) started once per session.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_decoder import MODEL, FakeDecoder
from gateway_process import API_KEY, Gateway, free_port, start_gateway, stop_gateway


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
    gw = start_gateway(
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
    stop_gateway(gw)


@pytest.fixture(scope="session")
def gateway_auth(
    fake_decoder: FakeDecoder, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gw = start_gateway(
        tmp_path_factory.mktemp("gw_auth"),
        fake_decoder.port,
        "--max-concurrent-requests",
        "1",
        env={"GLIMPSE_API_KEY": API_KEY},
    )
    yield gw
    stop_gateway(gw)


@pytest.fixture(scope="session")
def gateway_down(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(
        tmp_path_factory.mktemp("gw_down"),
        free_port(),
        "--served-model-name",
        MODEL,
        "--decoder-wait-timeout",
        "1",
    )
    yield gw
    stop_gateway(gw)
