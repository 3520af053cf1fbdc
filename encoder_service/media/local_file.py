"""``file://`` URLs, confined to ``--allowed-local-media-path``.

Contract: ``read_local_file(url, allowed_dir, max_bytes)`` returns the bytes of a regular file
inside ``allowed_dir`` or raises ``EncodeError(INVALID)``. Refused: file URLs when no directory
is allowed, hosts other than ``localhost``, ``..`` segments (also percent-encoded), paths that
resolve outside the directory (symlinks included), and anything that is not a regular file.
The file is opened component by component from the allowed directory with ``O_NOFOLLOW``, so a
symlink swapped in after the check cannot redirect the read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import unquote, urlsplit

from encoder_service.errors import invalid

_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def allowed_root(allowed_dir: str) -> Path:
    """The resolved allowed directory; raises ValueError when it is not a directory."""
    root = Path(allowed_dir).resolve()
    if not root.is_dir():
        raise ValueError(f"--allowed-local-media-path {allowed_dir!r} is not a directory")
    return root


def _requested_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise invalid("file:// URLs must not name a host")
    if parts.query or parts.fragment:
        raise invalid("file:// URLs must not carry a query or fragment")
    path = unquote(parts.path)
    if "\x00" in path or "\\" in path:
        raise invalid("file path contains a forbidden character")
    if not path.startswith("/"):
        raise invalid("file:// URLs must hold an absolute path")
    if any(segment == ".." for segment in path.split("/")):
        raise invalid("file path must not contain '..'")
    return Path(path)


def read_local_file(url: str, allowed_dir: str | None, max_bytes: int) -> bytes:
    if allowed_dir is None:
        raise invalid("file:// URLs are disabled (the encoder has no --allowed-local-media-path)")
    root = allowed_root(allowed_dir)
    target = _requested_path(url).resolve()
    if root not in target.parents:
        raise invalid("file is outside the allowed local media directory")
    fd = os.open(root, _NOFOLLOW | os.O_DIRECTORY)
    try:
        for name in target.relative_to(root).parts:
            try:
                child = os.open(name, _NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                raise invalid("file does not exist") from None
            except OSError:
                raise invalid("file cannot be opened (symlink or permission)") from None
            os.close(fd)
            fd = child
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise invalid("path is not a regular file")
        if info.st_size > max_bytes:
            raise invalid(f"file is larger than the {max_bytes}-byte limit")
        with os.fdopen(fd, "rb", closefd=True) as fh:
            fd = -1
            data = fh.read(max_bytes + 1)
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > max_bytes:
        raise invalid(f"file is larger than the {max_bytes}-byte limit")
    return data
