"""Media bytes from a request item: raw bytes, http(s), ``data:`` or ``file://`` URLs.

Contract: ``load_media_bytes(item, limits)`` returns the item's encoded bytes (at most
``limits.max_media_bytes``) or raises ``EncodeError`` (INVALID for bad input, TIMEOUT when the
fetch timeout runs out). It blocks: the pipeline calls it from a worker thread.

HTTP rules (the SSRF checklist): only http/https; the URL string must be plain ASCII without
whitespace, control characters, backslashes or userinfo; the host is resolved once, every address
must be public (unless ``allow_private_media_urls``), and the connection goes to that address
(so DNS rebinding cannot swap it); redirects are followed by hand, at most ``max_redirects``,
each hop validated like the first; name resolution, connect, each read and the whole download
share one deadline (a resolver that does not answer is abandoned at it);
the body is read in chunks and the download is abandoned at the byte cap whatever
Content-Length claims. https always verifies the certificate chain and the host name; the TLS
handshake sends the URL's host name (SNI) and checks the certificate against it even though the
socket goes to the pre-resolved address. ``media_ca_bundle`` replaces the system trust store
(a private CA, or a test CA). Decoding the bytes does not belong here.
"""

from __future__ import annotations

import functools
import http.client
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from encoder_service.config import MediaLimits
from encoder_service.errors import invalid, timeout
from encoder_service.items import MediaItem
from encoder_service.media.addresses import resolve_public
from encoder_service.media.data_url import decode_data_url
from encoder_service.media.local_file import read_local_file

_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
_USER_AGENT = "glimpse-encoder/0.1"


def load_media_bytes(item: MediaItem, limits: MediaLimits) -> bytes:
    if item.url is None:
        data = item.data or b""
        if not data:
            raise invalid("media bytes are empty")
        if len(data) > limits.max_media_bytes:
            raise invalid(f"media is larger than the {limits.max_media_bytes}-byte limit")
        return data
    scheme = item.url.split(":", 1)[0].lower() if ":" in item.url else ""
    if scheme in ("http", "https"):
        return fetch_http(item.url, limits)
    if scheme == "data":
        return decode_data_url(item.url, limits.max_media_bytes)
    if scheme == "file":
        return read_local_file(item.url, limits.allowed_local_media_path, limits.max_media_bytes)
    raise invalid("URL must be http(s), data or file")


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    request_path: str  # path + query, what goes on the request line


def _parse_http_url(url: str, limits: MediaLimits) -> _Target:
    if not url.isascii() or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise invalid("URL contains whitespace, control or non-ASCII characters")
    if "\\" in url:
        raise invalid("URL contains a backslash")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise invalid("URL must be http(s), data or file")
    if "@" in parts.netloc:
        raise invalid("URL must not contain userinfo ('@' in the host part)")
    host = parts.hostname
    if not host:
        raise invalid("URL has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise invalid("URL has an invalid port") from None
    if limits.allowed_media_domains and not any(
        host == d or host.endswith("." + d) for d in limits.allowed_media_domains
    ):
        raise invalid(f"host {host!r} is not in the allowed media domains")
    path = parts.path or "/"
    return _Target(scheme, host, port, path + (f"?{parts.query}" if parts.query else ""))


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Sends ``Host: <name>`` but connects to an address chosen (and checked) beforehand."""

    def __init__(self, host: str, port: int, address: str, timeout_s: float) -> None:
        super().__init__(host, port, timeout=timeout_s)
        self._address = address
        # NOTE: http.client drops ``self.sock`` when the response will close the connection;
        # this reference keeps the socket reachable so each read can get the remaining deadline.
        self.pinned: socket.socket | None = None

    def connect(self) -> None:
        self.sock = self.pinned = socket.create_connection((self._address, self.port), self.timeout)


@functools.lru_cache(maxsize=4)
def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """A verifying client context (built once: loading a trust store takes milliseconds)."""
    context = ssl.create_default_context(cafile=ca_bundle)
    # create_default_context already sets these; stated so a later edit cannot weaken them quietly
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    return context


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """TLS to a pre-checked address; SNI and certificate checks still use the host name."""

    def __init__(
        self, host: str, port: int, address: str, timeout_s: float, context: ssl.SSLContext
    ) -> None:
        super().__init__(host, port, timeout=timeout_s, context=context)
        self._address = address
        self.pinned: socket.socket | None = None

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self.pinned = self._context.wrap_socket(sock, server_hostname=self.host)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise timeout("media fetch timed out")
    return left


def fetch_http(url: str, limits: MediaLimits) -> bytes:
    deadline = time.monotonic() + limits.media_fetch_timeout_s
    for _hop in range(limits.max_redirects + 1):
        target = _parse_http_url(url, limits)
        allow_private = limits.allow_private_media_urls
        address = resolve_public(target.host, target.port, allow_private, _remaining(deadline))[0]
        conn: _PinnedHTTPConnection | _PinnedHTTPSConnection
        if target.scheme == "https":
            context = tls_context(limits.media_ca_bundle)
            conn = _PinnedHTTPSConnection(
                target.host, target.port, address, _remaining(deadline), context
            )
        else:
            conn = _PinnedHTTPConnection(target.host, target.port, address, _remaining(deadline))
        try:
            status, location, body = _request(conn, target, limits, deadline)
        finally:
            conn.close()
        if status in _REDIRECTS:
            if not location:
                raise invalid(f"HTTP {status} redirect without a Location header")
            url = urljoin(url, location)
            continue
        return body
    raise invalid(f"too many redirects (more than {limits.max_redirects})")


def _request(
    conn: _PinnedHTTPConnection | _PinnedHTTPSConnection,
    target: _Target,
    limits: MediaLimits,
    deadline: float,
) -> tuple[int, str | None, bytes]:
    """One hop: (status, Location header, body); the body is read only for 200."""
    try:
        conn.request(
            "GET",
            target.request_path,
            headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"},
        )
        resp = conn.getresponse()
        if resp.status in _REDIRECTS:
            return resp.status, resp.getheader("Location"), b""
        if resp.status != 200:
            raise invalid(f"URL returned HTTP {resp.status}")
        declared = resp.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_media_bytes:
            raise invalid(f"media is larger than the {limits.max_media_bytes}-byte limit")
        return 200, None, _read_capped(conn, resp, limits.max_media_bytes, deadline)
    except TimeoutError:
        raise timeout("media fetch timed out") from None
    except ssl.SSLCertVerificationError as exc:
        # verify_message is OpenSSL's short reason ("self-signed certificate", "Hostname
        # mismatch, ..."): library text, not an object repr, so it is safe to show.
        reason = exc.verify_message or "certificate rejected"
        raise invalid(
            f"TLS certificate of host {target.host!r} failed verification ({reason})"
        ) from None
    except ssl.SSLError:
        raise invalid(f"TLS handshake with host {target.host!r} failed") from None
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise invalid(f"URL could not be fetched ({reason})") from None


def _read_capped(
    conn: _PinnedHTTPConnection | _PinnedHTTPSConnection,
    resp: http.client.HTTPResponse,
    max_bytes: int,
    deadline: float,
) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        left = _remaining(deadline)
        if conn.pinned is not None:
            conn.pinned.settimeout(left)
        chunk = resp.read1(_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > max_bytes:
            raise invalid(f"media is larger than the {max_bytes}-byte limit")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise invalid("URL returned an empty body")
    return body
