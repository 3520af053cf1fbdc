"""``data:`` URLs: base64 payloads only, size-checked before decoding.

Contract: ``decode_data_url(url, max_bytes)`` returns the payload bytes or raises
``EncodeError(INVALID)``. The declared media type is ignored: the decoder sniffs the bytes.
"""

from __future__ import annotations

import base64
import binascii

from encoder_service.errors import invalid


def decode_data_url(url: str, max_bytes: int) -> bytes:
    if url[:5].lower() != "data:":
        raise invalid("not a data: URL")
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise invalid("data: URL has no ',' before its payload")
    if not header.lower().endswith(";base64"):
        raise invalid("data: URL must be base64 encoded (data:<type>;base64,<payload>)")
    # 4 base64 characters carry 3 bytes; refuse before allocating the decoded buffer.
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise invalid(f"data: URL payload is larger than the {max_bytes}-byte limit")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("data: URL payload is not valid base64") from None
    if len(data) > max_bytes:
        raise invalid(f"data: URL payload is larger than the {max_bytes}-byte limit")
    if not data:
        raise invalid("data: URL payload is empty")
    return data
