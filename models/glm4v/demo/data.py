"""Training data of the demo model: scenes -> processor inputs, labels and batches.

Contract: ``encode_example(processor, ex, thinking)`` turns one ``scenes.Example`` into the
model's inputs with the loss only on the answer (which ends with the end-of-turn token), plus the
auxiliary targets of ``heads.py`` (one row per picture, one label pair per merged vision token);
``batches(args, out)`` streams collated batches from worker processes (a batch is all images or
all videos). Seeded: worker ``w`` of seed ``s`` always draws the same examples.
Not here: the model, the losses, the optimiser (``train.py``, ``heads.py``).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from models.glm4v.demo import scenes

END_OF_TURN = "<|user|>"


def messages_for(ex: scenes.Example) -> list[dict]:
    media = {"type": "image"} if ex.image is not None else {"type": "video"}
    return [{"role": "user", "content": [media, {"type": "text", "text": ex.question}]}]


def video_inputs(ex: scenes.Example):
    from transformers.video_utils import VideoMetadata

    frames = np.stack([np.asarray(f) for f in ex.frames])  # [F, H, W, 3] uint8
    n = len(ex.frames)
    meta = VideoMetadata(
        total_num_frames=n,
        fps=ex.fps,
        width=frames.shape[2],
        height=frames.shape[1],
        duration=n / ex.fps,
    )
    return frames, meta


_PROMPTS: dict[tuple[str, bool, bool], str] = {}


def render_prompt(processor, ex: scenes.Example, thinking: bool) -> str:
    """The chat-template text; memoised because a handful of prompts repeat all run long and
    rendering costs more than drawing and preprocessing an image."""
    key = (ex.question, ex.image is not None, thinking)
    if key not in _PROMPTS:
        _PROMPTS[key] = processor.apply_chat_template(
            messages_for(ex), add_generation_prompt=True, tokenize=False, enable_thinking=thinking
        )
    return _PROMPTS[key]


def encode_example(processor, ex: scenes.Example, thinking: bool) -> dict:
    prompt = render_prompt(processor, ex, thinking)
    if ex.image is not None:
        enc = processor(text=[prompt], images=[ex.image], return_tensors="pt")
    else:
        frames, meta = video_inputs(ex)
        enc = processor(text=[prompt], videos=[frames], video_metadata=[meta], return_tensors="pt")
    answer = processor.tokenizer(ex.answer + END_OF_TURN, add_special_tokens=False)["input_ids"]
    prompt_ids = enc["input_ids"][0]
    item = {
        "input_ids": torch.cat([prompt_ids, torch.tensor(answer)]),
        "labels": torch.cat([torch.full_like(prompt_ids, -100), torch.tensor(answer)]),
        "mm_token_type_ids": torch.cat(
            [enc["mm_token_type_ids"][0], torch.zeros(len(answer), dtype=torch.long)]
        ),
    }
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if key in enc:
            item[key] = enc[key]
    item["aux"] = aux_targets(ex)
    grid = item.get("image_grid_thw", item.get("video_grid_thw"))[0].tolist()
    item["token_labels"] = token_labels(ex, grid)
    item["kind"] = torch.tensor(scenes.KINDS.index(ex.kind))
    return item


def aux_targets(ex: scenes.Example) -> torch.Tensor:
    """[shape, colour, count-1, direction, cx, cy] for the auxiliary vision heads; -100 / -1 = n/a.

    Supervising the vision tower directly (pooled features -> what was drawn, and where) gives
    it a strong signal from the first step instead of only through the language model's loss.
    """
    objs, (w, h) = ex.objects, ex.size
    single = len(objs) == 1
    shape = scenes.SHAPES.index(objs[0].shape) if single else -100
    color = list(scenes.COLORS).index(objs[0].color) if single else -100
    motion = scenes.DIRECTIONS.index(ex.answer) if ex.kind == "motion" else -100
    cx, cy = (objs[0].cx / w, objs[0].cy / h) if single and ex.image is not None else (-1.0, -1.0)
    return torch.tensor([shape, color, len(objs) - 1, motion, cx, cy], dtype=torch.float32)


def token_labels(ex: scenes.Example, grid: list[int]) -> torch.Tensor:
    """[tokens, 2] (shape, colour) under each merged vision token, 0 = background, -100 for
    video tokens. Dense labels teach the tower what every part of a shape looks like, a far
    stronger signal than one label per picture."""
    t, gh, gw = grid
    n = t * (gh // 2) * (gw // 2)
    if ex.image is None:
        return torch.full((n, 2), -100, dtype=torch.long)
    mask = Image.new("L", ex.size, 0)
    for p in ex.objects:
        code = (
            1
            + scenes.SHAPES.index(p.shape) * len(scenes.COLORS)
            + list(scenes.COLORS).index(p.color)
        )
        scenes.draw_shape(mask, p, fill=code)
    # one sample at the centre of each token's 28x28 cell, row-major like the merger's output
    codes = torch.from_numpy(np.asarray(mask.resize((gw // 2, gh // 2), Image.NEAREST)).copy())
    codes = codes.flatten().long()
    fg = codes > 0
    shape = torch.where(fg, (codes - 1) // len(scenes.COLORS) + 1, 0)
    color = torch.where(fg, (codes - 1) % len(scenes.COLORS) + 1, 0)
    return torch.stack([shape, color], dim=1)


class SceneStream(IterableDataset):
    """Yields whole collated batches. A batch is all images or all videos: transformers finds
    video frames by the image token too, so it cannot tell them apart inside one batch."""

    def __init__(
        self,
        model_dir: Path,
        seed: int,
        batch_size: int,
        video_share: float = 0.2,
        image_kinds: tuple[str, ...] = (),
    ) -> None:
        self.model_dir, self.seed, self.batch_size = model_dir, seed, batch_size
        self.video_share = video_share  # the chance that a batch is videos
        # question kinds of picture batches, drawn uniformly (repeat a kind to weight it)
        self.image_kinds = image_kinds or tuple(k for k in scenes.KINDS if k != "motion")

    def __iter__(self):
        from transformers import AutoProcessor

        torch.set_num_threads(1)  # many workers: one thread each, or they fight over the cores
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        processor = AutoProcessor.from_pretrained(self.model_dir)
        rng = random.Random(self.seed * 1000 + wid)
        pad = processor.tokenizer.pad_token_id
        while True:
            video = rng.random() < self.video_share
            items = []
            for _ in range(self.batch_size):
                kind = "motion" if video else rng.choice(self.image_kinds)
                ex = scenes.make_example(rng, kind)
                items.append(encode_example(processor, ex, thinking=rng.random() < 0.5))
            yield collate(items, pad)


def batches(args: argparse.Namespace, out: Path) -> DataLoader:
    """The full model's batches (the vision stage has its own stream, seed + 1)."""
    return DataLoader(
        SceneStream(out, args.seed, args.batch_size, args.video_share, tuple(args.image_kinds)),
        batch_size=None,
        num_workers=args.workers,
        prefetch_factor=4 if args.workers else None,
    )


def collate(items: list[dict], pad_id: int) -> dict:
    n = max(len(i["input_ids"]) for i in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), -100, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    types = torch.zeros((len(items), n), dtype=torch.long)
    for b, it in enumerate(items):
        k = len(it["input_ids"])
        ids[b, :k], labels[b, :k], mask[b, :k] = it["input_ids"], it["labels"], 1
        types[b, :k] = it["mm_token_type_ids"]
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "mm_token_type_ids": types}
    batch["aux"] = torch.stack([it["aux"] for it in items])
    batch["kind"] = torch.stack([it["kind"] for it in items])
    batch["token_labels"] = torch.cat([it["token_labels"] for it in items])
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [it[key] for it in items if key in it]
        if parts:
            batch[key] = torch.cat(parts)
    return batch
