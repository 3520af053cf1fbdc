"""Build a GLM-4.5V / GLM-4.6V model from a checkpoint directory (or with random weights).

Contract: ``load_model(model_path, dtype, device, load_format, vision, text, seed, quantization)
-> Glm4vMoeForCausalLM``.
- ``safetensors`` / ``auto``: reads ``model.safetensors.index.json`` (sharded) or
  ``model.safetensors``. A shard named by the index but absent, a tensor with the wrong shape, or a
  tensor the model needs but the checkpoint lacks raises ``CheckpointError`` naming it.
- FP8 weights (``float8_e4m3fn``) are dequantised to ``dtype`` at load: per-output-channel
  ``weight_scale`` ``[out, 1]`` (compressed-tensors) or block ``weight_scale_inv``
  ``[ceil(out/bo), ceil(in/bi)]`` (``quant_method: fp8``, blocks from ``weight_block_size``).
- ``dummy``: random weights, generated in place on ``device``.
- ``quantization`` (``auto`` | ``fp8`` | ``none``) picks the FP8 compute path
  (``fp8_compute_enabled``): ``auto`` when the checkpoint declares a ``quantization_config`` and
  ``device`` is a CUDA GPU with compute capability >= 8.9; ``fp8`` forces it (a bf16 checkpoint
  or ``dummy`` weights are quantised per channel; an unsupported device is a ``ValueError``);
  ``none`` dequantises. In FP8 compute the text decoder's projections and experts stay
  ``float8_e4m3fn`` on the GPU with per-output-channel scales: per-channel checkpoints load as
  they are, 128x128 block checkpoints are re-quantised per output row at load
  (``requantize_block``), dummy FP8 weights are drawn chunk by chunk on the GPU.
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
from models.layers.fp8 import (
    FP8_DTYPE,
    Fp8Weight,
    fp8_device_supported,
    quantize_per_channel,
    random_fp8_,
)

log = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy")
QUANTIZATION_MODES = ("auto", "fp8", "none")
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
    quantization: str = "auto",
) -> Glm4vMoeForCausalLM:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} not in {LOAD_FORMATS}")
    config = load_model_config(model_path)
    device = torch.device(device)
    fp8 = text and fp8_compute_enabled(config, device, quantization)
    if fp8:
        log.info("FP8 compute: text decoder weights stay float8_e4m3fn on %s", device)
    model = build_model(config, dtype, device, vision=vision, text=text, fp8=fp8)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        reader = CheckpointReader(Path(model_path), lambda n: _wanted(n, vision, text))
        keep_fp8 = model.fp8_checkpoint_name if fp8 else None
        report = model.load_weights(reader.tensors(config, keep_fp8, device))
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


def fp8_compute_enabled(config: ModelConfig, device: torch.device, quantization: str) -> bool:
    """Whether the text decoder keeps FP8 weights and runs FP8 GEMMs (see the module doc)."""
    if quantization not in QUANTIZATION_MODES:
        raise ValueError(f"quantization {quantization!r} not in {QUANTIZATION_MODES}")
    if quantization == "none" or (quantization == "auto" and config.quant.method is None):
        return False
    if fp8_device_supported(device):
        return True
    if quantization == "fp8":
        raise ValueError(
            f"--quantization fp8 needs a CUDA GPU with compute capability >= 8.9, not {device}"
        )
    return False  # auto on CPU or an older GPU: FP8 checkpoints are dequantised at load


def build_model(
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    vision: bool,
    text: bool,
    fp8: bool = False,
) -> Glm4vMoeForCausalLM:
    """Uninitialised model on ``device``: the text half via meta, the tower built in place."""
    if not text:
        with torch.device(device):
            return Glm4vMoeForCausalLM(config, dtype, vision=True, text=False)
    with torch.device("meta"):
        model = Glm4vMoeForCausalLM(config, dtype, vision=False, text=True, fp8=fp8)
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
    """Random weights in place: matrices N(0, 0.02), norms 1, biases and router bias 0.
    FP8 matrices get the codes and per-row scales of N(0, 0.02) weights."""
    params = dict(model.named_parameters())
    for i, (name, p) in enumerate(params.items()):
        gen = torch.Generator(device=p.device).manual_seed(seed + i)
        if p.dtype == FP8_DTYPE:
            random_fp8_(p, params[name + "_scale"], DUMMY_STD, gen)
        elif name.endswith("_scale") and name[: -len("_scale")] in params:
            continue  # filled with its FP8 weight
        elif name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight")):
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

    def tensors(
        self,
        config: ModelConfig,
        keep_fp8: Callable[[str], bool] | None = None,
        device: torch.device | None = None,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of the wanted parts, file by file, FP8 weights dequantised, except
        those ``keep_fp8`` accepts: they come as e4m3 codes followed by ``<name>_scale``
        ``[out, 1]`` float32 (block scales re-quantised per row on ``device``)."""
        by_file = sorted(self.files, key=lambda n: (str(self.files[n]), n))
        for name in by_file:
            if name.endswith(_SCALE_SUFFIXES):
                continue
            tensor = self.get(name)
            if tensor.dtype == FP8_DTYPE and keep_fp8 is not None and keep_fp8(name):
                codes, scale = self._per_channel(name, tensor, config, device)
                yield name, codes
                yield name + "_scale", scale
                continue
            if tensor.dtype in _FP8_DTYPES:
                tensor = self._dequantize(name, tensor, config)
            yield name, tensor

    def _per_channel(
        self, name: str, weight: torch.Tensor, config: ModelConfig, device: torch.device | None
    ) -> Fp8Weight:
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        if base + ".weight_scale_inv" in self.files:
            scale_inv = self.get(base + ".weight_scale_inv")
            block = config.quant.weight_block_size or (128, 128)
            return requantize_block(name, weight, scale_inv, block, device)
        if base + ".weight_scale" not in self.files:
            raise CheckpointError(f"FP8 tensor {name!r} has no weight_scale or weight_scale_inv")
        scale = self.get(base + ".weight_scale").float()
        rows = weight.shape[0]
        if scale.numel() == 1:  # one scale for the whole tensor
            return Fp8Weight(weight, scale.reshape(1, 1).expand(rows, 1).contiguous())
        if scale.numel() != rows:
            raise CheckpointError(
                f"{name}: weight_scale {list(scale.shape)} does not match {rows} output rows"
            )
        return Fp8Weight(weight, scale.reshape(rows, 1))

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


def requantize_block(
    name: str,
    weight: torch.Tensor,  # [out, in] float8_e4m3fn
    scale_inv: torch.Tensor,  # [ceil(out/bo), ceil(in/bi)] float32
    block: tuple[int, int],
    device: torch.device | None = None,  # where the float32 math runs (the GPU at load)
) -> Fp8Weight:  # codes [out, in] float8_e4m3fn, scale [out, 1] float32
    """Block-scaled FP8 -> per-output-row FP8: dequantise in float32, then quantise each row.

    Precision cost: a row's scale now comes from its largest block. Values keep e4m3's relative
    step (error <= 2^-4 of the value) as long as they stay in its normal range, i.e. above
    2^-6 * 448 = 7 row-scale units; smaller values (blocks whose amax is far below the row's)
    fall into the subnormal range and are rounded to a fixed step, error <= 2^-10 * row scale.
    The re-rounding adds to the checkpoint's own rounding of the original weights, so the
    result is within about 2^-3 of them, against 2^-4 for the block weights.
    """
    w = dequantize_block(name, weight.to(device), scale_inv.to(device), block)  # float32
    return quantize_per_channel(w)
