"""Media fetching: a hung resolver is abandoned at the fetch deadline; https verifies certificates.

The fetcher runs in-process, so ``socket.getaddrinfo`` is replaced to simulate a resolver that
never answers or to point a test name at the loopback TLS server. The TLS server's certificate is
a throwaway self-signed one made with the ``openssl`` command at test time.
"""

from __future__ import annotations

import dataclasses
import http.server
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

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


@dataclasses.dataclass
class TLSServer:
    port: int
    ca_file: str  # the server's own self-signed certificate, usable as a trust bundle
    sni: list[str | None]  # server names the clients sent, in order

    def url(self, host: str, path: str = "/a.png") -> str:
        return f"https://{host}:{self.port}{path}"


def _self_signed(tmp: Path) -> tuple[str, str]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    command = [
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        "-subj", "/CN=media.test", "-addext", "subjectAltName=DNS:media.test",
        "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    try:
        subprocess.run(command, check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot make a test certificate with the openssl command: {exc}")
    return str(cert), str(key)


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        body = b"tls-bytes" if self.path == "/a.png" else b""
        self.send_response(200 if body else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[TLSServer]:
    cert, key = _self_signed(tmp_path_factory.mktemp("tls"))
    sni: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda _sock, name, _ctx: sni.append(name)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    # a failed handshake raises OSError in accept(); socketserver drops that connection and
    # keeps serving
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield TLSServer(server.server_address[1], cert, sni)
    server.shutdown()
    server.server_close()


@pytest.fixture
def test_names(monkeypatch):
    """Resolve media.test and other.test to 127.0.0.1; every other name as usual."""
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host in ("media.test", "other.test"):
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)


def test_https_fetch_with_a_trusted_ca_sends_the_host_name(tls_server, test_names):
    trusted = dataclasses.replace(LOOPBACK_OK, media_ca_bundle=tls_server.ca_file)
    tls_server.sni.clear()
    # the socket goes to the resolved 127.0.0.1, yet the handshake names the URL's host
    assert load(tls_server.url("media.test"), trusted) == b"tls-bytes"
    assert tls_server.sni == ["media.test"]


def test_https_certificates_are_verified_by_default(tls_server, test_names):
    message = refused(tls_server.url("media.test"), LOOPBACK_OK)  # system store only
    assert "certificate" in message and "media.test" in message


def test_https_certificate_must_match_the_url_host(tls_server, test_names):
    trusted = dataclasses.replace(LOOPBACK_OK, media_ca_bundle=tls_server.ca_file)
    # same server, same address, trusted CA: only the name differs from the certificate's
    message = refused(tls_server.url("other.test"), trusted)
    assert "other.test" in message and "certificate" in message
    message = refused(tls_server.url("127.0.0.1"), trusted)
    assert "127.0.0.1" in message and "certificate" in message
