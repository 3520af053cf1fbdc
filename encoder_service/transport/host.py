"""Host identity: decides whether an encoder and a decoder may share memory.

Two processes are on the same host when both the kernel boot id and the hostname agree. The boot
id separates machines (and reboots) that share a hostname; the hostname separates containers
that do not share a UTS namespace, which usually means they do not share an IPC namespace either.
Either signal can be wrong (containers with ``ipc: host`` but their own hostnames), so the importer
still falls back to ``grpc_stream`` when a pool cannot be opened, and a flag can force a path.

The pid namespace is kept beside the identity so an importer can tell whether the owner pid of a
pool is meaningful in its own namespace (to detect an encoder that died after replying).

Not here: path selection (importer.py).
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass

_BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
_UNKNOWN = "unknown"


@dataclass(frozen=True)
class HostIdentity:
    boot_id: str  # kernel boot id (a fresh uuid per boot on Linux)
    hostname: str

    @property
    def key(self) -> str:
        """Compact wire form: ``hostname/boot_id``."""
        return f"{self.hostname}/{self.boot_id}"

    @classmethod
    def from_key(cls, key: str) -> HostIdentity:
        hostname, sep, boot_id = key.rpartition("/")
        if not sep or not hostname or not boot_id:
            raise ValueError(f"host id {key!r} is not of the form hostname/boot_id")
        return cls(boot_id=boot_id, hostname=hostname)


def _read_boot_id() -> str:
    try:
        with open(_BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip() or _UNKNOWN
    except OSError:
        return _UNKNOWN


@functools.cache
def local_host() -> HostIdentity:
    """This process's host identity (read once)."""
    return HostIdentity(boot_id=_read_boot_id(), hostname=socket.gethostname())


@functools.cache
def pid_namespace() -> str:
    """An id of this process's pid namespace (``pid:[inode]`` on Linux, ``unknown`` elsewhere)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return _UNKNOWN


def process_alive(pid: int, namespace: str) -> bool | None:
    """Whether ``pid`` (as seen from ``namespace``) is running; None when it cannot be told."""
    if namespace == _UNKNOWN or namespace != pid_namespace():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it just belongs to someone else
    return True
