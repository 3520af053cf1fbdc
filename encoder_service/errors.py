"""Errors of the encoder service, each carrying the kind of failure the client sees.

Contract: every failure the pipeline can report to a client is an ``EncodeError`` with an
``ErrorKind``; the servicer maps kinds to gRPC status codes (nothing else here knows about gRPC).
Messages are written by this package and never embed third-party exception text, which can leak
object reprs and heap addresses.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    INVALID = "invalid"  # bad input: the client must change the request
    TIMEOUT = "timeout"  # a fetch timeout or the request deadline ran out
    EXHAUSTED = "exhausted"  # the encoder has no room right now (store full)
    NOT_FOUND = "not_found"  # unknown or expired embedding id
    UNAVAILABLE = "unavailable"  # loading or shutting down


class EncodeError(Exception):
    """A failure to report to the client, with a message safe to show."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def for_item(self, label: str) -> EncodeError:
        """The same error with the failing item named in front of the message."""
        return EncodeError(self.kind, f"{label}: {self.message}")


def invalid(message: str) -> EncodeError:
    return EncodeError(ErrorKind.INVALID, message)


def timeout(message: str) -> EncodeError:
    return EncodeError(ErrorKind.TIMEOUT, message)
