"""Media fetching: a hung resolver is abandoned at the fetch deadline; https verifies certificates.

The fetcher runs in-process, so ``socket.getaddrinfo`` is replaced to simulate a resolver that
never answers or to point a test name at the loopback TLS server. The TLS server's certificate is
a throwaway self-signed one made with the ``openssl`` command at test time.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time

import pytest

from encoder_service.config import MediaLimits
from encoder_service.errors import EncodeError, ErrorKind
from encoder_service.items import MediaItem, Modality
from encoder_service.media.fetch import load_media_bytes

LOOPBACK_OK = MediaLimits(
    media_fetch_timeout_s=2.0, max_media_bytes=1 << 20, allow_private_media_urls=True
)


def load(url: str, limits: MediaLimits) -> bytes:
    return load_media_bytes(MediaItem(0, Modality.IMAGE, url=url), limits)


def refused(url: str, limits: MediaLimits, kind: ErrorKind = ErrorKind.INVALID) -> str:
    with pytest.raises(EncodeError) as info:
        load(url, limits)
    assert info.value.kind is kind, info.value.message
    return info.value.message


@pytest.fixture
def hung_resolver(monkeypatch):
    """getaddrinfo that blocks until the test ends (bounded), counting calls."""
    release = threading.Event()
    calls: list[str] = []

    def blocking(host, *args, **kwargs):
        calls.append(host)
        release.wait(10.0)
        raise socket.gaierror(socket.EAI_AGAIN, "resolver gave up")

    monkeypatch.setattr(socket, "getaddrinfo", blocking)
    yield calls
    release.set()


def test_hung_resolver_is_abandoned_at_the_fetch_timeout(hung_resolver):
    limits = dataclasses.replace(LOOPBACK_OK, media_fetch_timeout_s=0.3)
    start = time.monotonic()
    message = refused("http://stuck.example:8080/a.png", limits, ErrorKind.TIMEOUT)
    elapsed = time.monotonic() - start
    assert hung_resolver == ["stuck.example"]  # the lookup did start
    assert "stuck.example" in message and "resolv" in message
    assert elapsed < 1.5, f"fetch waited {elapsed:.2f}s for a resolver past its 0.3s timeout"

