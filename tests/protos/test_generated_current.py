"""The committed gRPC code matches protos/*.proto (a stale stub would silently drop fields)."""

from __future__ import annotations

from protos import build


def test_generated_code_is_current():
    assert build.main(["--check"]) == 0
