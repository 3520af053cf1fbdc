"""Syntactic checks of image/video URLs at the edge, and data-URL decoding.

The gateway refuses what is malformed before it costs the decoder or an encoder anything: schemes
other than http(s)/data/file, userinfo, backslashes, whitespace or control characters (parser
differentials, RELIABILITY.md §3.2), and data URLs that are not valid base64. Network policy (which
hosts and addresses may be fetched, redirects, size caps) and local-path allow-listing are enforced
where the fetch happens, in the encoder service; this module never resolves or fetches anything.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import NamedTuple
from urllib.parse import urlsplit

_BAD_CHARS = re.compile(r"[\\\s\x00-\x1f\x7f]")
_SCHEMES = ("http", "https", "data", "file")


class DataURL(NamedTuple):
    mime_type: str
    data: bytes


def check_media_url(url: str) -> str:
    """Return ``url`` unchanged if it is acceptable, else raise ValueError with a safe message."""
    if not url:
        raise ValueError("url must not be empty")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in _SCHEMES:
        raise ValueError("URL must be http(s), data or file")
    if scheme == "data":
        decode_data_url(url)
        return url
    if _BAD_CHARS.search(url):
        raise ValueError("URL must not contain whitespace, backslashes or control characters")
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises on a malformed port
    except ValueError as exc:
        raise ValueError("URL is malformed") from exc
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError("file URLs must be absolute: file:///path")
        return url
    if "@" in parts.netloc:
        raise ValueError("URLs with credentials (user@host) are not accepted")
    if not parts.hostname:
        raise ValueError("URL has no host")
    return url


def decode_data_url(url: str) -> DataURL:
    """Decode ``data:<mime>;base64,<payload>``; raise ValueError when it is not that."""
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise ValueError("data URLs must be of the form data:<mime>;base64,<payload>")
    mime = header[len("data:") : -len(";base64")].strip()
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("data URL payload is not valid base64") from exc
    if not data:
        raise ValueError("data URL payload is empty")
    return DataURL(mime, data)
