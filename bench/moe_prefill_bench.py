"""Prefill-sized FP8 routed experts: every path the MoE layer can take, at GLM-4.5V widths.

``python -m bench.moe_prefill_bench [--tokens 1024,4096,8192] [--iters 10] [--sweep
w8a16|w8a8]`` (CUDA) builds one routed-expert layer of GLM-4.5V / 4.6V (128 experts, hidden 4096, expert width 1408,
top-8) with FP8 e4m3 weights and one float32 scale per output row, routes ``T`` random bf16
tokens with the model's router, and times, for each ``T``:

- ``w8a16``: the fused Triton kernels reading the codes with bf16 activations (decode's path;
  prefill's with ``GLIMPSE_FP8_ACTIVATIONS=0``);
- ``w8a8``: the same kernels with per-token e4m3 activations (``fp8_activations``; prefill's
  default);
- ``scaled_grouped_mm``: sort + ``torch._scaled_grouped_mm`` (W8A8, row-wise scales) + combine;
- ``bf16_grouped_mm``: the dequantised weights through ``torch._grouped_mm`` (the bf16 model's
  path; weights of twice the bytes).

Each row prints milliseconds per call, TFLOP/s (``2 * T * top_k * 3 * hidden * width``: the
routed GEMMs only) and the largest difference from the W8A16 output relative to its largest
value. ``--sweep PATH`` also searches the fused kernels' tiles of that path (``w8a16`` or
``w8a8``) at the largest ``T`` and prints the best choice for each row-block height. Not a
test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable

import torch

from kernels import fused_moe
from models.glm4v.config import TextConfig
from models.layers.moe import TopKRouter, experts_grouped

# tile choices swept per kernel: (block_n, block_k, stages, warps), for each block_m
SWEEP_BLOCK_M = (64, 128)
SWEEP_TILES = tuple(itertools.product((64, 128, 256), (64, 128), (3, 4), (4, 8)))


def timed(fn: Callable[[], torch.Tensor], iters: int) -> float:
    """Mean milliseconds per call after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def fp8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row e4m3 codes and float32 scales of ``w [E, N, K]``."""
    scale = w.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / 448.0
    return (w.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def layer(cfg: TextConfig, dev: torch.device):
    gen = torch.Generator(device=dev).manual_seed(0)
    h, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    w13 = torch.randn(e, 2 * i, h, generator=gen, device=dev, dtype=torch.bfloat16) / h**0.5
    w2 = torch.randn(e, h, i, generator=gen, device=dev, dtype=torch.bfloat16) / i**0.5
    q13, s13 = fp8_rows(w13)
    q2, s2 = fp8_rows(w2)
    del w13, w2
    router = TopKRouter(h, e, cfg.num_experts_per_tok, n_group=1, topk_group=1).to(dev)
    router.weight.data.normal_(generator=gen)
    return router, q13, s13, q2, s2


def experts_paths(x, route, fp8: tuple, bf16: tuple) -> dict[str, Callable[[], torch.Tensor]]:
    q13, s13, q2, s2 = fp8
    return {
        "w8a16": lambda: fused_moe.fused_experts(
            x, q13, q2, route.weights, route.ids, w13_scale=s13, w2_scale=s2,
            foreign_slots=False, fp8_activations=False, out_dtype=torch.bfloat16,
        ),
        "w8a8": lambda: fused_moe.fused_experts(
            x, q13, q2, route.weights, route.ids, w13_scale=s13, w2_scale=s2,
            foreign_slots=False, fp8_activations=True, out_dtype=torch.bfloat16,
        ),
        "scaled_grouped_mm": lambda: experts_grouped(
            x, q13, q2, route, foreign_slots=False, w13_scale=s13, w2_scale=s2,
            use_triton=False, out_dtype=torch.bfloat16,
        ),
        "bf16_grouped_mm": lambda: experts_grouped(
            x, *bf16, route, foreign_slots=False, use_triton=False, out_dtype=torch.bfloat16,
        ),
    }  # fmt: skip


def with_tiles(block_m: int, up: tuple, down: tuple) -> None:
    """Make the fused kernels use these tiles past MAX_SLOTS (the caller restores them)."""
    fused_moe.PREFILL_BLOCK_M = block_m
    fused_moe._tile_configs = lambda slots, fp8=False, fp8_act=False: (
        fused_moe.TileConfig(*up),
        fused_moe.TileConfig(*down),
    )


@torch.inference_mode()
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1024,4096,8192")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--sweep", choices=("w8a16", "w8a8"), help="also sweep this path's tiles")
    a = p.parse_args()
    dev = torch.device("cuda")
    cfg = TextConfig()
    router, q13, s13, q2, s2 = layer(cfg, dev)
    deq13 = (q13.float() * s13).to(torch.bfloat16)
    deq2 = (q2.float() * s2).to(torch.bfloat16)
    k, h, inter = cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    print(f"{'tokens':>6}  {'path':<20} {'ms':>8} {'TFLOP/s':>8} {'rel diff':>9}")
    for t in (int(s) for s in a.tokens.split(",")):
        x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
        flops = 2 * t * k * 3 * h * inter
        paths = experts_paths(x, router(x), (q13, s13, q2, s2), (deq13, deq2))
        ref = paths["w8a16"]().float()
        for name, fn in paths.items():
            try:
                ms = timed(fn, a.iters)
                diff = float((fn().float() - ref).abs().max() / ref.abs().max())
                print(f"{t:>6}  {name:<20} {ms:>8.2f} {flops / ms / 1e9:>8.0f} {diff:>9.2e}")
            except (RuntimeError, ValueError) as err:
                print(f"{t:>6}  {name:<20} failed: {str(err).splitlines()[0][:80]}")
        if a.sweep and t == max(int(s) for s in a.tokens.split(",")):
            sweep(paths[a.sweep], a.sweep == "w8a8", t * k, flops, a.iters)
    return 0


def sweep(fn: Callable[[], torch.Tensor], fp8_act: bool, slots: int, flops: int, iters: int):
    """For each block_m: the best gate/up tiles with the default down tiles, then the best down
    tiles with that gate/up choice; prints the best pair of each block_m."""
    saved = fused_moe.PREFILL_BLOCK_M, fused_moe._tile_configs
    default_up, default_down = saved[1](slots, True, fp8_act)
    try:
        for bm in SWEEP_BLOCK_M:
            up = min(SWEEP_TILES, key=lambda c: _try(fn, iters, bm, c, default_down))
            down = min(SWEEP_TILES, key=lambda c: _try(fn, iters, bm, up, c))
            ms = _try(fn, iters, bm, up, down)
            print(
                f"  sweep block_m {bm:>3} gate/up {up} down {down}: {ms:.2f} ms, "
                f"{flops / ms / 1e9:.0f} TFLOP/s"
            )
    finally:
        fused_moe.PREFILL_BLOCK_M, fused_moe._tile_configs = saved


def _try(fn: Callable[[], torch.Tensor], iters: int, block_m: int, up, down) -> float:
    with_tiles(block_m, up, down)
    try:
        return timed(fn, iters)
    except Exception:  # noqa: BLE001 - a tile choice that does not compile or fit shared memory
        return float("inf")


if __name__ == "__main__":
    raise SystemExit(main())
