"""Fixtures of the ``glimpse`` CLI tests.

``fake_server`` (module): a fake OpenAI streaming server (fake_openai_server.py) shared by a test
module; ``fake``: the same server with its behaviour and records reset for one test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fake_openai_server import FakeServer, start_fake_server


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    state, stop = start_fake_server()
    yield state
    stop()


@pytest.fixture
def fake(fake_server: FakeServer) -> FakeServer:
    fake_server.reset()
    return fake_server
