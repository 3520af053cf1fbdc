"""Build a GLM-4.5V / GLM-4.6V model from a checkpoint directory (or with random weights).

Contract: ``load_model(model_path, dtype, device, load_format, vision, text) -> Glm4vMoeForCausalLM``.
- ``safetensors`` / ``auto``: reads ``model.safetensors.index.json`` (sharded) or
  ``model.safetensors``. A shard named by the index but absent, a tensor with the wrong shape, or a
  tensor the model needs but the checkpoint lacks raises ``CheckpointError`` naming it.
- FP8 weights (``float8_e4m3fn``) are dequantised to ``dtype`` at load: per-output-channel
  ``weight_scale`` ``[out, 1]`` (compressed-tensors) or block ``weight_scale_inv``
  ``[ceil(out/bo), ceil(in/bi)]`` (``quant_method: fp8``, blocks from ``weight_block_size``).
- ``dummy``: random weights, generated in place on ``device``.
The text decoder is created on the meta device and materialised straight on ``device`` (a
107B-parameter model never passes through host memory); only the checkpoint tensors a part
needs are read, so a vision-only encoder does not touch the expert shards.

What does not belong here: name mapping (model.py), FP8 compute kernels, process groups.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from models.glm4v.config import ModelConfig, load_model_config
from models.glm4v.errors import CheckpointError
from models.glm4v.model import VISION_PREFIX, Glm4vMoeForCausalLM, build_vision_tower

log = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SCALE_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".input_scale")
DUMMY_STD = 0.02


def load_model(
    model_path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    load_format: str = "auto",
    vision: bool = True,
    text: bool = True,
    seed: int = 0,
) -> Glm4vMoeForCausalLM:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} not in {LOAD_FORMATS}")
    config = load_model_config(model_path)
    device = torch.device(device)
    model = build_model(config, dtype, device, vision=vision, text=text)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        reader = CheckpointReader(Path(model_path), lambda n: _wanted(n, vision, text))
        report = model.load_weights(reader.tensors(config))
        if report.unexpected:
            log.warning(
                "ignored %d unknown checkpoint tensors, e.g. %s",
                len(report.unexpected),
                report.unexpected[:3],
            )
        missing = [n for n in model.checkpoint_names() if n not in report.loaded]
        if missing:
            raise CheckpointError(
                f"checkpoint {model_path} lacks {len(missing)} required tensors, e.g. {missing[:5]}"
            )
    return model.requires_grad_(False).eval()


def build_model(
    config: ModelConfig, dtype: torch.dtype, device: torch.device, vision: bool, text: bool
) -> Glm4vMoeForCausalLM:
    """Uninitialised model on ``device``: the text half via meta, the tower built in place."""
    if not text:
        with torch.device(device):
            return Glm4vMoeForCausalLM(config, dtype, vision=True, text=False)
    with torch.device("meta"):
        model = Glm4vMoeForCausalLM(config, dtype, vision=False, text=True)
    materialize(model, device)
    if vision:
        # NOTE: the tower computes constant buffers at construction, so it is built on the
        # target device directly instead of via meta (it is <1% of the parameters).
        with torch.device(device):
            model.visual = build_vision_tower(config, dtype)
    return model


def materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Allocate meta parameters on ``device`` (contents undefined) and recompute buffers."""
    # to_empty replaces Parameter objects, dropping their weight_loader attributes
    loaders = {
        n: p.weight_loader for n, p in model.named_parameters() if hasattr(p, "weight_loader")
    }
    model.to_empty(device=device)
    for n, p in model.named_parameters():
        if n in loaders:
            p.weight_loader = loaders[n]
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights in place: matrices N(0, 0.02), norms 1, biases and router bias 0."""
    for i, (name, p) in enumerate(model.named_parameters()):
        gen = torch.Generator(device=p.device).manual_seed(seed + i)
        if name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight")):
            p.fill_(1.0)
        elif name.endswith((".bias", "e_score_correction_bias")):
            p.zero_()
        else:
            p.normal_(0.0, DUMMY_STD, generator=gen)


def _wanted(name: str, vision: bool, text: bool) -> bool:
    return vision if name.startswith(VISION_PREFIX) else text


class CheckpointReader:
    """Tensor names -> safetensors files of one checkpoint directory, opened lazily.

    Only names accepted by ``wanted`` are read; a missing shard is an error only when it holds
    one of them (an encoder can run from the vision shards alone).
    """

    def __init__(self, path: Path, wanted: Callable[[str], bool] = lambda name: True) -> None:
        self.path = path
        self.files: dict[str, Path] = {}  # tensor name -> file
        self._handles: dict[Path, object] = {}
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
            weight_map = {n: f for n, f in weight_map.items() if wanted(n)}
            for shard in sorted(set(weight_map.values())):
                if not (path / shard).is_file():
                    raise CheckpointError(
                        f"checkpoint shard {shard} listed in {INDEX_FILE} is missing"
                    )
            self.files = {name: path / shard for name, shard in weight_map.items()}
        elif (path / SINGLE_FILE).is_file():
            with safe_open(path / SINGLE_FILE, framework="pt") as f:
                self.files = dict.fromkeys(filter(wanted, f.keys()), path / SINGLE_FILE)
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")

    def get(self, name: str) -> torch.Tensor:
        file = self.files[name]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(file, framework="pt", device="cpu")
        try:
            return handle.get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"tensor {name!r} missing from {file.name}: {exc}") from exc

    def tensors(self, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of the wanted parts, file by file, FP8 weights dequantised."""
        by_file = sorted(self.files, key=lambda n: (str(self.files[n]), n))
        for name in by_file:
            if name.endswith(_SCALE_SUFFIXES):
                continue
            tensor = self.get(name)
            if tensor.dtype in _FP8_DTYPES:
                tensor = self._dequantize(name, tensor, config)
            yield name, tensor

    def _dequantize(self, name: str, weight: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        if base + ".weight_scale_inv" in self.files:
            scale = self.get(base + ".weight_scale_inv")
            block = config.quant.weight_block_size or (128, 128)
            return dequantize_block(name, weight, scale, block)
        if base + ".weight_scale" in self.files:
            return dequantize_per_channel(name, weight, self.get(base + ".weight_scale"))
        raise CheckpointError(f"FP8 tensor {name!r} has no weight_scale or weight_scale_inv")


def dequantize_per_channel(
    name: str,
    weight: torch.Tensor,  # [out, in] float8
    scale: torch.Tensor,  # [out, 1], [out] or [] float32
) -> torch.Tensor:  # [out, in] float32
    if scale.numel() == 1:
        return weight.float() * scale.float().reshape(())
    if scale.numel() != weight.shape[0]:
        raise CheckpointError(
            f"{name}: weight_scale {list(scale.shape)} does not match {weight.shape[0]} output rows"
        )
    return weight.float() * scale.float().reshape(-1, 1)


def dequantize_block(
    name: str,
    weight: torch.Tensor,  # [out, in] float8
    scale_inv: torch.Tensor,  # [ceil(out/bo), ceil(in/bi)] float32
    block: tuple[int, int],
) -> torch.Tensor:  # [out, in] float32
    out_dim, in_dim = weight.shape
    bo, bi = block
    expected = (math.ceil(out_dim / bo), math.ceil(in_dim / bi))
    if tuple(scale_inv.shape) != expected:
        raise CheckpointError(
            f"{name}: weight_scale_inv {list(scale_inv.shape)}, expected {list(expected)} "
            f"for {list(weight.shape)} in {bo}x{bi} blocks"
        )
    s = scale_inv.float().repeat_interleave(bo, 0)[:out_dim].repeat_interleave(bi, 1)[:, :in_dim]
    return weight.float() * s
