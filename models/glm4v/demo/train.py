"""Train the embedded demo model: ``python -m models.glm4v.demo.train --out DIR``.

Contract: builds a small GLM-4.5V-architecture checkpoint (vision tower + MoE text decoder, the
project's own tokenizer and chat template), trains it on synthetic scenes from ``scenes.py``
drawn on the fly (seeded), evaluates greedy accuracy per question kind on a held-out seed, and
writes the result in Hugging Face format with the real checkpoint's tensor names. Training uses
transformers' ``Glm4vMoeForConditionalGeneration`` as the autograd model: the checkpoint it
writes is exactly what Glimpse and transformers both load. Runs on CUDA (minutes) or CPU (slow).

Not here: serving, the scene generator, batches and labels (``data.py``), the training-only
heads (``heads.py``), tokenizer construction.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.glm4v import tiny
from models.glm4v.config import load_model_config
from models.glm4v.demo import scenes
from models.glm4v.demo.data import batches, encode_example
from models.glm4v.demo.heads import HEAD_NAMES, AuxHeads, answer_hits, ratio
from models.glm4v.demo.vision_stage import TransformersSlotTower, train_vision
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
    heads = AuxHeads(config.vision_config.out_hidden_size).to(device)
    heads_file = Path(args.resume or out) / "aux_heads.pt"
    if args.resume and heads_file.exists():
        heads.load_state_dict(torch.load(heads_file, map_location=device))
    tower = model.model.visual.state_dict()
    if args.vision_steps:
        # Glimpse's own tower trains fast on its own; the weights load into transformers' by name
        tower = train_vision(args, out, device, tower, heads)
    # and it stands in for transformers' tower while the whole model trains (export and the
    # held-out evaluation below use transformers' own)
    model.model.visual = TransformersSlotTower(load_model_config(out).vision).to(device)
    model.model.visual.load_state_dict(tower)
    loader = batches(args, out)
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
    aux_stats = {k: torch.zeros(2, device=device) for k in HEAD_NAMES}
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
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            result = model(**batch)
            lm_loss = result.loss
            lm_stats += answer_hits(result.logits.detach(), batch["labels"], kind)
            aux_loss, hits = heads.loss(captured[0], grid, aux, tokens)
        for key, h in hits.items():
            aux_stats[key] += h
        loss = lm_loss + args.aux_weight * aux_loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if torch.isfinite(grad_norm):
            opt.step()
        else:  # one bad batch must not poison every weight
            skipped += 1
            if skipped == 1:
                print(f"step {step}: non-finite gradient in {first_bad_grad(model, heads)}")
        opt.zero_grad(set_to_none=True)
        avg = lm_loss.item() if avg is None else 0.98 * avg + 0.02 * lm_loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            vis = " ".join(f"{k} {ratio(v):.2f}" for k, v in aux_stats.items())
            lm = " ".join(
                f"{k} {ratio(v):.2f}" for k, v in zip(scenes.KINDS, lm_stats, strict=True)
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
    # judge what ships: the exported (bf16) weights as transformers loads them, not the fp32 copy
    del model
    shipped = Glm4vMoeForConditionalGeneration.from_pretrained(out, dtype=torch.float32).to(device)
    acc = evaluate(shipped, processor, device, seed=args.eval_seed, per_kind=args.eval_per_kind)
    report = {
        "steps": steps_done,
        "batch_size": args.batch_size,
        "train_seconds": round(elapsed),
        "steps_per_second": round(steps_done / max(elapsed, 1e-9), 2),
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
    p.add_argument("--video-share", type=float, default=0.2, help="share of video batches")
    p.add_argument(
        "--image-kinds",
        nargs="+",
        default=[],
        choices=[k for k in scenes.KINDS if k != "motion"],
        help="question kinds of picture batches (repeat one to weight it; default: all, evenly)",
    )
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument(
        "--vision-steps", type=int, default=0, help="vision-tower-only steps before the LM stage"
    )
    p.add_argument("--vision-lr", type=float, default=2e-3)
    p.add_argument(
        "--vision-data",
        choices=("gpu", "cpu"),
        default="gpu" if torch.cuda.is_available() else "cpu",
        help="vision stage pictures: drawn on the device in batches, or by the CPU workers",
    )
    p.add_argument(
        "--vision-time-budget-s", type=float, default=0.0, help="end the vision stage after this"
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
