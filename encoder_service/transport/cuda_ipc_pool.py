"""The ``cuda_ipc`` path: ONE preallocated GPU buffer per device, exported once by CUDA IPC.

Encoder side (``CudaIpcPool``): allocates the buffer, takes its IPC handle once (cupy's
``ipcGetMemHandle`` on a raw ``cudaMalloc`` when cupy imports, else torch's storage sharing), and
publishes the handle in the pool's shared-memory control block, beside the slot tables. Every
write is followed by a stream sync, so a descriptor is only handed out once its bytes are there.

Decoder side (``CudaIpcPoolView``): opens the handle once, in its own device's context (peer
access enabled lazily when the encoder's GPU is another one), and copies an item into a fresh
tensor it owns on its own device, on the current stream, then syncs that stream.

NOTE: a handle cannot be opened by the process that exported it; same-process use must go through
``grpc_stream`` (the importer falls back on ``PoolOpenError``).
NOTE: the importer must use the library the exporter used (the handle formats differ); without it
the open fails and the importer falls back to ``grpc_stream``.

Not here: descriptor validation and staleness checks (importer.py), slot policy (slots.py).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from encoder_service.transport.control_block import ControlBlock
from encoder_service.transport.errors import PoolOpenError
from encoder_service.transport.shm_pool import as_bytes


def preferred_ipc_library() -> str:
    return "cupy" if importlib.util.find_spec("cupy") is not None else "torch"


class CudaIpcPool:
    """Owner side: the GPU buffer, its exported handle, and the control block."""

    kind = "cuda_ipc"

    def __init__(
        self,
        pool_id: str,
        data_bytes: int,
        block_bytes: int,
        meta: dict,
        device: torch.device,
        library: str | None = None,
    ) -> None:
        self.device = device
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        library = library or preferred_ipc_library()
        self._keepalive: Any = None
        if library == "cupy":
            ipc = self._allocate_cupy(index, data_bytes)
        else:
            ipc = self._allocate_torch(index, data_bytes)
        ipc["device_index"] = index
        self.control = ControlBlock.create(
            pool_id,
            dict(meta, kind=self.kind, block_bytes=block_bytes, ipc=ipc),
            num_blocks=data_bytes // block_bytes,
            data_bytes=data_bytes,
            with_data=False,
        )

    def _allocate_cupy(self, index: int, data_bytes: int) -> dict:
        import cupy

        with cupy.cuda.Device(index):
            # A raw allocation (not cupy's pool) so the handle's base is the buffer itself.
            mem = cupy.cuda.Memory(data_bytes)
            handle = cupy.cuda.runtime.ipcGetMemHandle(mem.ptr)
            array = cupy.ndarray(
                (data_bytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0)
            )
        self._keepalive = mem
        self._data = torch.from_dlpack(array)  # [data_bytes] u8 on the pool's device
        return {"library": "cupy", "handle": bytes(handle).hex()}

    def _allocate_torch(self, index: int, data_bytes: int) -> dict:
        self._data = torch.zeros(data_bytes, dtype=torch.uint8, device=self.device)
        torch.cuda.synchronize(self.device)
        share = self._data.untyped_storage()._share_cuda_()
        _, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync = share
        return {
            "library": "torch",
            "handle": bytes(handle).hex(),
            "storage_bytes": int(size),
            "storage_offset": int(offset),
            "ref_counter": bytes(ref_handle).hex(),
            "ref_counter_offset": int(ref_offset),
            "event_handle": bytes(event_handle).hex(),
            "event_sync": bool(event_sync),
        }

    def write(self, offset: int, src: torch.Tensor) -> None:  # src: [n, H] any device
        flat = as_bytes(src)
        with torch.cuda.device(self.device):
            self._data[offset : offset + flat.numel()].copy_(flat, non_blocking=True)
            # NOTE: the reader is another process; only a sync makes the bytes visible to it
            # before the descriptor leaves this process.
            torch.cuda.current_stream(self.device).synchronize()

    def read(self, offset: int, nbytes: int) -> memoryview:
        """Host copy of a slot's bytes, for streaming to another host."""
        with torch.cuda.device(self.device):
            host = self._data[offset : offset + nbytes].cpu()
        return memoryview(host.numpy())

    def close(self) -> None:
        self.control.mark_closed()
        torch.cuda.synchronize(self.device)
        self._data = None  # type: ignore[assignment]
        self._keepalive = None
        self.control.close()


class CudaIpcPoolView:
    """Importer side: the encoder's buffer mapped into this process on ``device``."""

    kind = "cuda_ipc"

    def __init__(self, control: ControlBlock, device: torch.device) -> None:
        if device.type != "cuda" or not torch.cuda.is_available():
            raise PoolOpenError("a cuda_ipc pool needs CUDA in the importing process")
        self.control = control
        self.device = device
        ipc = control.meta["ipc"]
        self._library = ipc["library"]
        self._base_ptr = 0
        self._base: torch.Tensor | None = None
        with torch.cuda.device(device):
            if self._library == "cupy":
                self._open_cupy(ipc)
            elif self._library == "torch":
                self._open_torch(ipc)
            else:
                raise PoolOpenError(f"unknown IPC library {self._library!r}")

    def _open_cupy(self, ipc: dict) -> None:
        if importlib.util.find_spec("cupy") is None:
            raise PoolOpenError("pool was exported with cupy, which is not installed here")
        import cupy

        try:
            with cupy.cuda.Device(self.device.index):
                self._base_ptr = int(
                    cupy.cuda.runtime.ipcOpenMemHandle(bytes.fromhex(ipc["handle"]))
                )
        except cupy.cuda.runtime.CUDARuntimeError as e:
            raise PoolOpenError(f"cannot open CUDA IPC handle: {e}") from None

    def _open_torch(self, ipc: dict) -> None:
        torch.cuda.init()
        try:
            storage = torch.UntypedStorage._new_shared_cuda(
                self.device.index,  # open in this process's own device context
                bytes.fromhex(ipc["handle"]),
                ipc["storage_bytes"],
                ipc["storage_offset"],
                bytes.fromhex(ipc["ref_counter"]),
                ipc["ref_counter_offset"],
                bytes.fromhex(ipc["event_handle"]),
                ipc["event_sync"],
            )
        except RuntimeError as e:
            raise PoolOpenError(f"cannot open CUDA IPC handle: {e}") from None
        self._base = torch.empty(0, dtype=torch.uint8, device=self.device).set_(storage)

    def copy_out(self, offset: int, nbytes: int) -> torch.Tensor:  # -> [nbytes] u8 on device
        out = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        if nbytes == 0:
            return out
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            if self._base is not None:
                out.copy_(self._base[offset : offset + nbytes], non_blocking=True)
            else:
                import cupy

                cupy.cuda.runtime.memcpyAsync(
                    out.data_ptr(),
                    self._base_ptr + offset,
                    nbytes,
                    cupy.cuda.runtime.memcpyDefault,
                    stream.cuda_stream,
                )
            stream.synchronize()
        return out

    def close(self) -> None:
        if self._base_ptr:
            import cupy

            with cupy.cuda.Device(self.device.index):
                cupy.cuda.runtime.ipcCloseMemHandle(self._base_ptr)
            self._base_ptr = 0
        self._base = None
        self.control.close()
