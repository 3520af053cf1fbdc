"""Train the embedded demo model: ``python -m models.glm4v.demo.train --out DIR``.

Contract: builds a small GLM-4.5V-architecture checkpoint (vision tower + MoE text decoder, the
project's own tokenizer and chat template), trains it on synthetic scenes from ``scenes.py``
drawn on the fly (seeded), evaluates greedy accuracy per question kind on a held-out seed, and
writes the result in Hugging Face format with the real checkpoint's tensor names. Training uses
transformers' ``Glm4vMoeForConditionalGeneration`` as the autograd model: the checkpoint it
writes is exactly what Glimpse and transformers both load. Runs on CUDA (minutes) or CPU (slow).

Not here: serving, the scene generator, tokenizer construction.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset

from models.glm4v import tiny
from models.glm4v.demo import scenes
from models.glm4v.hf_names import export_weights
from models.glm4v.tokenizer_build import write_tokenizer_files

TEXT = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 256,
    "max_position_embeddings": 4096,
}
MROPE_SECTION = [4, 6, 6]  # sums to head_dim * 0.5 / 2
VISION = {
    "depth": 4,
    "hidden_size": 192,
    "num_heads": 4,
    "image_size": 112,
    "intermediate_size": 512,
    "out_hidden_size": 256,
}
# at most 64 LLM tokens per image (about 224x224 pixels), at least 16
IMAGE_SIZE = {"shortest_edge": 2 * 28 * 28 * 16, "longest_edge": 2 * 28 * 28 * 64}
VIDEO_SIZE = {"shortest_edge": 2 * 28 * 28 * 8, "longest_edge": 2 * 28 * 28 * 160}
END_OF_TURN = "<|user|>"


def write_base_checkpoint(out: Path) -> None:
    """Tokenizer, template, configs: everything but the weights."""
    out.mkdir(parents=True, exist_ok=True)
    template = tiny.CHAT_TEMPLATE_PATH.read_text()
    tokenizer = write_tokenizer_files(out, template)
    (out / "chat_template.jinja").write_text(template)
    ids = tokenizer.get_vocab(with_added_tokens=True)
    vocab = (tokenizer.get_vocab_size(with_added_tokens=True) + 63) // 64 * 64
    cfg = tiny.build_config("glm4.5v", vocab, ids)
    cfg["text_config"].update(TEXT)
    cfg["text_config"]["rope_scaling"]["mrope_section"] = MROPE_SECTION
    cfg["vision_config"].update(VISION)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    img = tiny._image_processor_config("glm4.5v") | {"size": IMAGE_SIZE}
    vid = tiny._video_processor_config("glm4.5v") | {
        "size": VIDEO_SIZE,
        "max_image_size": {"longest_edge": VIDEO_SIZE["longest_edge"]},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(img, indent=2) + "\n")
    (out / "video_preprocessor_config.json").write_text(json.dumps(vid, indent=2) + "\n")
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Glm4vProcessor"}))
    gen = {
        "do_sample": False,
        "eos_token_id": cfg["text_config"]["eos_token_id"],
        "pad_token_id": cfg["text_config"]["pad_token_id"],
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


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


class AuxHeads(torch.nn.Module):
    """Training-only heads on the merger output; never saved with the checkpoint."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.image = torch.nn.Linear(hidden, len(scenes.SHAPES) + len(scenes.COLORS) + 4 + 2)
        self.motion = torch.nn.Linear(2 * hidden, len(scenes.DIRECTIONS))
        self.token = torch.nn.Linear(hidden, 1 + len(scenes.SHAPES) + 1 + len(scenes.COLORS))

    def loss(
        self, feats: torch.Tensor, grid: torch.Tensor, aux: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # feats [N_tokens, H] merger output; grid [B, 3] one row per item; aux [B, 6]
        f = torch.nn.functional
        sizes = (grid.prod(-1) // 4).tolist()
        pooled, motion_in = [], []
        for item, t in zip(feats.float().split(sizes), grid[:, 0].tolist(), strict=True):
            pooled.append(item.mean(0))
            groups = item.view(t, -1, item.shape[-1]).mean(1)  # [t, H]
            motion_in.append(torch.cat([groups[0], groups[-1]]))
        out = self.image(torch.stack(pooled))
        n_s, n_c = len(scenes.SHAPES), len(scenes.COLORS)
        lab = aux[:, :4].long()
        loss = f.cross_entropy(out[:, :n_s], lab[:, 0], ignore_index=-100)
        loss = loss + f.cross_entropy(out[:, n_s : n_s + n_c], lab[:, 1], ignore_index=-100)
        loss = loss + f.cross_entropy(out[:, n_s + n_c : n_s + n_c + 4], lab[:, 2])
        has_center = aux[:, 4] >= 0
        if has_center.any():
            loss = loss + 10 * f.mse_loss(out[has_center, -2:], aux[has_center, 4:])
        per_token = self.token(feats.float())  # [N, 6 + 9]
        hits = {
            "token_shape": _hits(per_token[:, : n_s + 1], _foreground(tokens[:, 0])),
            "token_color": _hits(per_token[:, n_s + 1 :], _foreground(tokens[:, 1])),
            "shape": _hits(out[:, :n_s], lab[:, 0]),
            "color": _hits(out[:, n_s : n_s + n_c], lab[:, 1]),
            "count": _hits(out[:, n_s + n_c : n_s + n_c + 4], lab[:, 2]),
        }
        if (tokens[:, 0] >= 0).any():
            loss = loss + f.cross_entropy(per_token[:, : n_s + 1], tokens[:, 0], ignore_index=-100)
            loss = loss + f.cross_entropy(per_token[:, n_s + 1 :], tokens[:, 1], ignore_index=-100)
        if (lab[:, 3] >= 0).any():
            motion = self.motion(torch.stack(motion_in))
            loss = loss + f.cross_entropy(motion, lab[:, 3])
            hits["motion"] = _hits(motion, lab[:, 3])
        return torch.nan_to_num(loss), hits


def _foreground(labels: torch.Tensor) -> torch.Tensor:
    """Accuracy only over tokens on a shape: background tokens are most and easy."""
    return torch.where(labels > 0, labels, -100)


def _hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[2] (right, total) over the rows whose label applies."""
    ok = labels >= 0
    right = (logits.argmax(-1) == labels) & ok
    return torch.stack([right.sum(), ok.sum()]).float()


def answer_hits(logits: torch.Tensor, labels: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
    """[len(KINDS), 2] (right, total): an answer is right when every one of its tokens is the
    argmax under teacher forcing, which is what greedy decoding would produce."""
    pred = logits[:, :-1].argmax(-1)  # [B, L-1]
    target = labels[:, 1:]
    wrong = ((pred != target) & (target != -100)).any(-1)  # [B]
    out = torch.zeros(len(scenes.KINDS), 2, device=logits.device)
    out[:, 0].index_add_(0, kind, (~wrong).float())
    out[:, 1].index_add_(0, kind, torch.ones_like(kind, dtype=torch.float))
    return out


class SceneStream(IterableDataset):
    """Yields whole collated batches. A batch is all images or all videos: transformers finds
    video frames by the image token too, so it cannot tell them apart inside one batch."""

    def __init__(self, model_dir: Path, seed: int, batch_size: int) -> None:
        self.model_dir, self.seed, self.batch_size = model_dir, seed, batch_size

    def __iter__(self):
        from transformers import AutoProcessor

        torch.set_num_threads(1)  # many workers: one thread each, or they fight over the cores
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        processor = AutoProcessor.from_pretrained(self.model_dir)
        rng = random.Random(self.seed * 1000 + wid)
        pad = processor.tokenizer.pad_token_id
        image_kinds = [k for k in scenes.KINDS if k != "motion"]
        while True:
            video = rng.random() < 0.2
            items = []
            for _ in range(self.batch_size):
                kind = "motion" if video else rng.choice(image_kinds)
                ex = scenes.make_example(rng, kind)
                items.append(encode_example(processor, ex, thinking=rng.random() < 0.5))
            yield collate(items, pad)


def batches(args: argparse.Namespace, out: Path):
    """The vision-only steps' batches (``--vision-batch-size``: those steps are cheap, so they
    can see many more pictures), then the full model's, as one stream."""

    def stream(batch_size: int, seed: int) -> DataLoader:
        return DataLoader(
            SceneStream(out, seed, batch_size),
            batch_size=None,
            num_workers=args.workers,
            prefetch_factor=4 if args.workers else None,
        )

    if args.vision_steps:
        vision = stream(args.vision_batch_size or args.batch_size, args.seed + 1)
        for step, batch in enumerate(vision):
            if step >= args.vision_steps:
                break
            yield batch
    yield from stream(args.batch_size, args.seed)


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


@torch.no_grad()
def evaluate(model, processor, device, seed: int, per_kind: int) -> dict[str, float]:
    model.eval()
    rng = random.Random(seed)
    acc = {}
    for kind in scenes.KINDS:
        right = 0
        for _ in range(per_kind):
            ex = scenes.make_example(rng, kind)
            item = encode_example(processor, ex, thinking=False)
            k = int((item["labels"] == -100).sum())
            skip = ("labels", "aux", "kind", "token_labels")
            inputs = {key: v.to(device) for key, v in item.items() if key not in skip}
            inputs["input_ids"] = inputs["input_ids"][:k][None]
            inputs["mm_token_type_ids"] = inputs["mm_token_type_ids"][:k][None]
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
            text = processor.tokenizer.decode(out[0, k:], skip_special_tokens=True).strip()
            right += text == ex.answer
        acc[kind] = right / per_kind
    model.train()
    return acc


def first_bad_grad(*modules: torch.nn.Module) -> str:
    for module in modules:
        for name, param in module.named_parameters():
            if param.grad is not None and not torch.isfinite(param.grad).all():
                return name
    return "?"


def _ratio(v: torch.Tensor) -> float:
    right, total = v.tolist()
    return right / total if total else float("nan")


def train(args: argparse.Namespace) -> dict:
    from transformers import AutoProcessor, Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    write_base_checkpoint(out)
    processor = AutoProcessor.from_pretrained(out)
    device = torch.device(args.device)
    config = Glm4vMoeConfig.from_pretrained(out)
    if args.resume:  # a checkpoint this script wrote: go on training it
        model = Glm4vMoeForConditionalGeneration.from_pretrained(args.resume, dtype=torch.float32)
        model = model.to(device)
    else:
        model = Glm4vMoeForConditionalGeneration(config).to(device=device, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f}M", flush=True)
    loader = batches(args, out)
    heads = AuxHeads(config.vision_config.out_hidden_size).to(device)
    heads_file = Path(args.resume or out) / "aux_heads.pt"
    if args.resume and heads_file.exists():
        heads.load_state_dict(torch.load(heads_file, map_location=device))
    captured: list[torch.Tensor] = []
    model.model.visual.register_forward_hook(lambda _m, _i, out: captured.append(out.pooler_output))
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    start, avg = time.time(), None

    def progress(step: int) -> float:
        """Fraction of the run done: by steps, or by wall time when a time budget is set."""
        by_time = (time.time() - start) / args.time_budget_s if args.time_budget_s else 0.0
        return min(1.0, max(step / max(1, args.steps), by_time))

    def lr_at(step: int) -> float:
        warm = min(1.0, (step + 1) / args.warmup)
        return args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress(step))))

    model.train()
    steps_done, waited, t_wait, skipped = 0, 0.0, time.time(), 0
    names = ("token_shape", "token_color", "shape", "color", "count", "motion")
    aux_stats = {k: torch.zeros(2, device=device) for k in names}
    lm_stats = torch.zeros(len(scenes.KINDS), 2, device=device)
    for step, batch in enumerate(loader):
        waited += time.time() - t_wait
        if progress(step) >= 1.0:
            break
        steps_done = step + 1
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        aux, kind, tokens = batch.pop("aux"), batch.pop("kind"), batch.pop("token_labels")
        grid = batch.get("image_grid_thw", batch.get("video_grid_thw"))
        captured.clear()
        vision_only = step < args.vision_steps
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            if vision_only:  # the tower and its heads alone: cheap steps that teach it to see
                if "pixel_values" in batch:
                    model.model.get_image_features(batch["pixel_values"], grid)
                else:
                    model.model.get_video_features(batch["pixel_values_videos"], grid)
                lm_loss = torch.zeros((), device=device)
            else:
                result = model(**batch)
                lm_loss = result.loss
                lm_stats += answer_hits(result.logits.detach(), batch["labels"], kind)
            aux_loss, hits = heads.loss(captured[0], grid, aux, tokens)
        for key, h in hits.items():
            aux_stats[key] += h
        loss = lm_loss + (1.0 if vision_only else args.aux_weight) * aux_loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if torch.isfinite(grad_norm):
            opt.step()
        else:  # one bad batch must not poison every weight
            skipped += 1
            if skipped == 1:
                print(f"step {step}: non-finite gradient in {first_bad_grad(model, heads)}")
        opt.zero_grad(set_to_none=True)
        if not vision_only:
            avg = lm_loss.item() if avg is None else 0.98 * avg + 0.02 * lm_loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            vis = " ".join(f"{k} {_ratio(v):.2f}" for k, v in aux_stats.items())
            lm = " ".join(
                f"{k} {_ratio(v):.2f}" for k, v in zip(scenes.KINDS, lm_stats, strict=True)
            )
            print(
                f"step {step:5d} loss {avg or 0.0:.4f} lr {lr_at(step):.2e}"
                f" {time.time() - start:.0f}s (data wait {waited:.0f}s, skipped {skipped})"
                f" | vision: {vis}"
                f" | answers: {lm}",
                flush=True,
            )
            for v in (*aux_stats.values(), lm_stats):
                v.zero_()
        t_wait = time.time()
    elapsed = time.time() - start
    save_file(export_weights(model), str(out / "model.safetensors"), {"format": "pt"})
    if args.save_aux_heads:  # only to resume training; never part of the shipped checkpoint
        torch.save(heads.state_dict(), out / "aux_heads.pt")
    acc = evaluate(model, processor, device, seed=args.eval_seed, per_kind=args.eval_per_kind)
    report = {
        "steps": steps_done,
        "batch_size": args.batch_size,
        "train_seconds": round(elapsed),
        "data_wait_seconds": round(waited),
        "skipped_steps": skipped,
        "device": str(device),
        "parameters": n_params,
        "heldout_accuracy": acc,
    }
    print(json.dumps(report, indent=2), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--vision-batch-size", type=int, default=0, help="batch of the vision-only steps (0: same)"
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument(
        "--vision-steps", type=int, default=0, help="first steps train only the vision tower"
    )
    p.add_argument("--aux-weight", type=float, default=0.5, help="auxiliary vision-head loss")
    p.add_argument("--time-budget-s", type=float, default=0.0, help="stop after this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default="", help="checkpoint directory to continue training")
    p.add_argument("--save-aux-heads", action="store_true", help="keep the heads to resume")
    p.add_argument("--eval-seed", type=int, default=10_000)
    p.add_argument("--eval-per-kind", type=int, default=50)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default: fp32 + TF32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    train(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
