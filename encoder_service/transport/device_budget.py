"""A byte budget for fetched vision features kept on the decoder's device.

Contract: ``DeviceBudget(limit_bytes, host)`` places tensors: ``place(t, device)`` returns ``t``
on ``device`` while the features it already holds there plus ``t`` fit in ``limit_bytes``, else
``t`` on ``host`` (the features wait in host memory, and prefill copies the rows it needs). A held
tensor's bytes return to the budget when the tensor is garbage (``weakref.finalize``: the engine
dropping a finished request frees them, on whatever thread that happens). ``held`` is the bytes
held now, ``overflowed`` how many tensors went to the host. Thread-safe.

Why: every admitted request's features are fetched when it is admitted, so a long queue would
otherwise hold them all on the GPU, beyond what the KV pool's sizing left free (the decoder
reserves ``limit_bytes`` out of the KV pool for them).
"""

from __future__ import annotations

import threading
import weakref

import torch


class DeviceBudget:
    def __init__(self, limit_bytes: int, host: torch.device | str = "cpu") -> None:
        if limit_bytes < 0:
            raise ValueError("the device budget must not be negative")
        self.limit_bytes = limit_bytes
        self.host = torch.device(host)
        self.held = 0
        self.overflowed = 0
        self._lock = threading.Lock()

    def place(self, t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        nbytes = t.nbytes
        with self._lock:
            fits = self.held + nbytes <= self.limit_bytes
            if fits:
                self.held += nbytes
            else:
                self.overflowed += 1
        if not fits:
            return t.to(self.host)
        try:
            out = t.to(device)
        except BaseException:
            self._release(nbytes)
            raise
        weakref.finalize(out, self._release, nbytes)
        return out

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes
