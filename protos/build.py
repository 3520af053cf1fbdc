"""Generate Python modules from ``protos/*.proto`` (``python -m protos.build``).

Generated files (``protos/*_pb2.py``, ``*_pb2.pyi``, ``*_pb2_grpc.py``) are committed so clients and
services import them without a build step; ``--check`` regenerates into a temporary directory and
fails when the committed files differ (run by the test suite).
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto; imports come out as ``from protos import x_pb2``."""
    protos = sorted(PROTO_DIR.glob("*.proto"))
    if not protos:
        return []
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted((out_dir / "protos").glob("*_pb2*.py*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        produced = generate(Path(tmp))
        stale = []
        for path in produced:
            target = PROTO_DIR / path.name
            if args.check:
                if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                    stale.append(path.name)
            else:
                target.write_bytes(path.read_bytes())
        if args.check:
            expected = {p.name for p in produced}
            extra = [p.name for p in PROTO_DIR.glob("*_pb2*.py*") if p.name not in expected]
            if stale or extra:
                print(f"stale generated code: {stale + extra}; run `make protos`", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
