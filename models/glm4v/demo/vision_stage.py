"""The demo trainer's first stage: the vision tower alone learns to see, fast.

Contract: ``train_vision(args, out, device, init, heads)`` trains Glimpse's own ``VisionTower``
(the same module and parameter names the server runs; one padded SDPA call per layer instead of
one per image), starting from the tower weights ``init``, with the training-only heads of
``heads.py`` (trained in place), for ``--vision-steps`` batches of ``--vision-batch-size``
scenes or ``--vision-time-budget-s``, whichever ends first. ``--vision-data gpu`` draws the
pictures on the device with ``render.py`` and the videos with the CPU workers; ``cpu`` draws
everything with the CPU workers. It returns the tower's state dict, whose names are the
checkpoint's after ``model.visual.`` (so it loads into transformers' ``model.visual`` as is).
``TransformersSlotTower`` is the same tower in transformers' ``model.visual`` slot.
Not here: the language-model stage and export (``train.py``), data (``data.py``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import time
from pathlib import Path

import torch

from models.glm4v.config import VisionConfig, load_model_config
from models.glm4v.demo import render
from models.glm4v.demo.data import SceneStream
from models.glm4v.demo.heads import HEAD_NAMES, AuxHeads, ratio
from models.glm4v.processing.processor import MultimodalProcessor
from models.glm4v.vision import VisionTower

VIDEO_EVERY = 5  # GPU pipeline: every fifth batch is CPU-drawn videos


def train_vision(
    args: argparse.Namespace,
    out: Path,
    device: torch.device,
    init: dict[str, torch.Tensor],
    heads: AuxHeads,
) -> dict[str, torch.Tensor]:
    """Trains from the tower weights ``init`` (and ``heads``, in place); returns the weights."""
    cfg = load_model_config(out).vision
    tower = VisionTower(cfg).to(device)
    tower.load_state_dict(init)
    tower.padded_attention = True
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.01, betas=(0.9, 0.98))
    gpu_pictures = args.vision_data == "gpu"
    # on the GPU pipeline the CPU workers draw only the videos (one batch in VIDEO_EVERY)
    cpu_stream = SceneStream(
        out,
        args.seed + 1,
        args.batch_size if gpu_pictures else args.vision_batch_size or args.batch_size,
        video_share=1.0 if gpu_pictures else args.video_share,
    )
    cpu_batches = iter(
        torch.utils.data.DataLoader(
            cpu_stream,
            batch_size=None,
            num_workers=args.workers,
            prefetch_factor=4 if args.workers else None,
            pin_memory=device.type == "cuda",
        )
    )
    limits = MultimodalProcessor.from_pretrained(out).config.image
    rng = random.Random(args.seed + 2)

    def next_batch(step: int) -> dict[str, torch.Tensor]:
        if gpu_pictures and step % VIDEO_EVERY:
            return render.random_batch(rng, args.vision_batch_size, limits, device)
        return next(cpu_batches)

    steps, warm = args.vision_steps, min(args.warmup, max(1, args.vision_steps // 10))
    budget = args.vision_time_budget_s
    stats = {k: torch.zeros(2, device=device) for k in HEAD_NAMES}
    start, waited, t_wait = time.time(), 0.0, time.time()
    tower.train()
    for step in itertools.count():
        done = max(step / steps, (time.time() - start) / budget if budget else 0.0)
        if done >= 1.0:
            break
        batch = next_batch(step)
        waited += time.time() - t_wait
        lr = args.vision_lr * min(1.0, (step + 1) / warm)
        lr *= 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * done))
        for g in opt.param_groups:
            g["lr"] = lr
        video = "pixel_values_videos" in batch
        pixels = batch["pixel_values_videos" if video else "pixel_values"]
        grid = batch["video_grid_thw" if video else "image_grid_thw"].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            feats = tower(pixels.to(device, non_blocking=True), grid)
            loss, hits = heads.loss(
                feats, grid, batch["aux"].to(device), batch["token_labels"].to(device)
            )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for key, h in hits.items():
            stats[key] += h
        if step % args.log_every == 0:
            vis = " ".join(f"{k} {ratio(v):.2f}" for k, v in stats.items())
            print(
                f"vision step {step:5d} loss {loss.item():.4f} lr {lr:.2e}"
                f" {time.time() - start:.0f}s (data wait {waited:.0f}s) | {vis}",
                flush=True,
            )
            for v in stats.values():
                v.zero_()
        t_wait = time.time()
    print(f"vision stage: {step} steps in {time.time() - start:.0f}s", flush=True)
    return {k: v.detach().clone() for k, v in tower.state_dict().items()}


class TransformersSlotTower(VisionTower):
    """Glimpse's tower (padded attention) in the place of transformers' ``model.visual`` for the
    language-model stage: the same parameter names and the call transformers makes, several
    times faster to train than transformers' per-image attention loop."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__(cfg)
        self.padded_attention = True
        self.spatial_merge_size = cfg.spatial_merge_size

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, **_) -> object:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=super().forward(pixel_values, grid_thw))
