"""Loads the vision tower (no LLM weights) and exposes it as the batcher's encode function.

Contract: ``load_tower(ModelLoad)`` returns a ``LoadedTower`` holding the checkpoint's model and
processor configs and ``encode(pixel_values [N, patch_dim], grid_thw [M, 3]) -> [N/4, H]`` on the
chosen device and dtype; uint8 ``pixel_values`` (``MediaPreparer(raw_patches=True)``) are copied
to the device as they are and normalised there with the image processor's constants.
``resolve_device`` / ``resolve_dtype`` turn the "auto" settings into concrete ones. Batching,
caching and serving do not belong here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from encoder_service.config import ModelLoad
from models.glm4v.config import ModelConfig, load_model_config
from models.glm4v.loader import load_model
from models.glm4v.processing.image import normalize_patches
from models.glm4v.processing.processor_config import ProcessorConfig, load_processor_config

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, model: ModelConfig, device: torch.device) -> torch.dtype:
    if name == "auto":
        # CPU kernels for half types are slow and CPU serving is for tests: keep float32 there.
        name = "float32" if device.type == "cpu" else model.torch_dtype
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class LoadedTower:
    model_config: ModelConfig
    processor: ProcessorConfig
    tower: torch.nn.Module
    device: torch.device
    dtype: torch.dtype

    def encode(
        self,
        pixel_values: torch.Tensor,  # [N, patch_dim] float32, or uint8 not yet normalised; cpu
        grid_thw: torch.Tensor,  # [M, 3] int64
    ) -> torch.Tensor:  # [N / merge**2, out_hidden] self.dtype on self.device
        if pixel_values.dtype == torch.uint8:
            # a quarter of the bytes to copy; normalised here as the processor would have
            raw = pixel_values.to(self.device, non_blocking=True)
            pixel_values = normalize_patches(raw, self.processor.image)
        x = pixel_values.to(self.device, self.dtype, non_blocking=True)
        return self.tower(x, grid_thw)

    @torch.inference_mode()
    def reserve_memory(self, patches: int, extra_bytes: int = 0) -> int:
        """CUDA: run one forward over ``patches`` patches (the batcher's budget) while holding
        ``extra_bytes`` more (what the embedding cache may fill), and keep that peak reserved in
        the caching allocator; returns the bytes reserved (0 elsewhere). A decoder sharing the
        GPU then sizes its KV cache around this process's largest footprint instead of meeting
        it later as an out-of-memory error."""
        if self.device.type != "cuda" or patches <= 0:
            return 0
        vision = self.model_config.vision
        merge = vision.spatial_merge_size
        # square images of 80x80 patches (a 1120x1120 photo) and one remainder fill the budget
        side = min(80, max(merge, int(patches**0.5) // merge * merge))
        grids = [(1, side, side)] * (patches // (side * side))
        rest = patches - len(grids) * side * side
        if rest >= merge * merge:
            grids.append((1, merge, rest // merge // merge * merge))
        if not grids:
            return 0
        total = sum(t * h * w for t, h, w in grids)
        hold = torch.empty(max(extra_bytes, 0), dtype=torch.uint8, device=self.device)
        raw = torch.zeros(total, vision.patch_dim, dtype=torch.uint8)
        self.encode(raw, torch.tensor(grids, dtype=torch.int64))
        torch.cuda.synchronize(self.device)
        del hold
        return torch.cuda.memory_reserved(self.device)


def load_tower(load: ModelLoad) -> LoadedTower:
    model_config = load_model_config(load.model_path)
    processor = load_processor_config(load.model_path)
    device = resolve_device(load.device)
    dtype = resolve_dtype(load.dtype, model_config, device)
    model = load_model(load.model_path, dtype, device, load.load_format, vision=True, text=False)
    if model.visual is None:
        raise RuntimeError("the loaded model has no vision tower")
    return LoadedTower(model_config, processor, model.visual, device, dtype)
