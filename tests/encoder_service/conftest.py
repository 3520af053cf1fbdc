"""Fixtures of the encoder service tests: a loopback HTTP server serving test media.

Contract: ``media_http`` is an HTTP server (``http.server`` in a thread) on 127.0.0.1 with routes
for plain files, redirects, slow bodies and oversized bodies. Media helpers live in
``encoder_media.py``; gRPC servers live in the test modules that use them.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest


@dataclass
class MediaHTTP:
    """A loopback HTTP server: ``routes`` maps a path to bytes; special paths are built in."""

    port: int
    routes: dict[str, bytes] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    delayed_now: int = 0  # /delay requests being served right now
    delayed_max: int = 0  # the most seen at once

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


class _Handler(http.server.BaseHTTPRequestHandler):
    media: MediaHTTP

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        path, _, query = self.path.partition("?")
        if path == "/redirect":  # /redirect?<absolute or relative target>
            self.send_response(302)
            self.send_header("Location", query)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/delay":  # /delay?<route>: that route's bytes after 0.2 s, counting overlap
            media = self.media
            with media.lock:
                media.delayed_now += 1
                media.delayed_max = max(media.delayed_max, media.delayed_now)
            threading.Event().wait(0.2)
            with media.lock:
                media.delayed_now -= 1
            self._send(media.routes[query])
        elif path == "/slow":
            self.media.release.wait(5.0)  # bounded: released at teardown
            self._send(b"late")
        elif path == "/huge-undeclared":  # no Content-Length: the client must stop at its cap
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(64):
                try:
                    self.wfile.write(b"\0" * 65536)
                except OSError:
                    return
        elif path == "/huge-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(1 << 30))
            self.end_headers()
        elif path in self.media.routes:
            self._send(self.media.routes[path])
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def _send(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="session")
def media_http() -> Iterator[MediaHTTP]:
    handler = type("Handler", (_Handler,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    media = MediaHTTP(port=server.server_address[1])
    handler.media = media
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield media
    media.release.set()
    server.shutdown()
    server.server_close()
