"""Vision-tower throughput: Glimpse's ``VisionTower`` vs transformers' GLM-4V vision model.

``python -m bench.encoder_bench [--batch-sizes 1,16] [--side 1120] [--depth 24]`` builds the
full-width tower (GLM-4.5V vision config) with random bf16 weights, copies the same weights into
transformers' ``Glm4vMoeVisionModel``, checks both give the same output, then times a forward over
``batch`` images of ``side`` x ``side`` pixels and prints images/s for each, in one process.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from models.glm4v.config import VisionConfig
from models.glm4v.vision import VisionTower


def hf_tower(cfg: VisionConfig, dtype: torch.dtype, device: str):
    from transformers.models.glm4v_moe.configuration_glm4v_moe import Glm4vMoeVisionConfig
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeVisionModel

    hf_cfg = Glm4vMoeVisionConfig(
        depth=cfg.depth,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        patch_size=cfg.patch_size,
        temporal_patch_size=cfg.temporal_patch_size,
        spatial_merge_size=cfg.spatial_merge_size,
        image_size=cfg.image_size,
        intermediate_size=cfg.intermediate_size,
        out_hidden_size=cfg.out_hidden_size,
    )
    hf_cfg._attn_implementation = "sdpa"
    return Glm4vMoeVisionModel(hf_cfg).to(device, dtype).eval()


def timed(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return (time.perf_counter() - start) / iters


def profile_forward(name: str, fn, batch: int, top: int) -> None:
    """Print the ``top`` kernels of one forward by device time."""
    from torch.profiler import ProfilerActivity, profile

    from bench.profile_decode import kernel_table

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    busy, launches, rows = kernel_table(prof, 1, top)
    print(f"== {name}, batch {batch}: GPU busy {busy:.1f} ms, {launches:.0f} kernels per forward")
    for kernel, us, n in rows:
        print(f"{us / 1e3:>9.2f} ms {n:>6.0f}x  {kernel[:100]}")


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--side", type=int, default=1120)
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile", type=int, default=0, help="print the top N kernels of each tower")
    a = p.parse_args()
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    cfg = VisionConfig(depth=a.depth)
    torch.manual_seed(0)
    ours = VisionTower(cfg).to(a.device, dtype).eval()
    for t in ours.parameters():
        t.normal_(0, 0.02)
    ref = hf_tower(cfg, dtype, a.device)
    missing = ref.load_state_dict(ours.state_dict(), strict=False)
    assert not missing.missing_keys, missing.missing_keys
    grid_side = a.side // cfg.patch_size
    rows = []
    for batch in [int(b) for b in a.batch_sizes.split(",")]:
        grid = torch.tensor([[1, grid_side, grid_side]] * batch, device=a.device)
        pixels = torch.randn(batch * grid_side**2, cfg.patch_dim, device=a.device, dtype=dtype)
        out = ours(pixels, grid)
        hf_out = ref(pixels, grid_thw=grid).pooler_output
        diff = (out.float() - hf_out.float()).abs().max().item()
        t_ours = timed(lambda p=pixels, g=grid: ours(p, g), a.iters)
        t_hf = timed(lambda p=pixels, g=grid: ref(p, grid_thw=g), a.iters)
        if a.profile:
            profile_forward("glimpse", lambda p=pixels, g=grid: ours(p, g), batch, a.profile)
            profile_forward(
                "transformers", lambda p=pixels, g=grid: ref(p, grid_thw=g), batch, a.profile
            )
        rows.append(
            {
                "batch": batch,
                "glimpse_img_s": batch / t_ours,
                "transformers_img_s": batch / t_hf,
                "speedup": t_hf / t_ours,
                "max_abs_diff": diff,
            }
        )
    print(
        f"{'batch':>5} {'glimpse img/s':>14} {'transformers img/s':>19} {'speedup':>8} {'diff':>8}"
    )
    for r in rows:
        print(
            f"{r['batch']:>5} {r['glimpse_img_s']:>14.2f} {r['transformers_img_s']:>19.2f} "
            f"{r['speedup']:>8.2f} {r['max_abs_diff']:>8.1e}"
        )
    print(json.dumps({"device": a.device, "side": a.side, "rows": rows}))


if __name__ == "__main__":
    main()
