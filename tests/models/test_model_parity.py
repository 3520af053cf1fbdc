"""Full-model parity (vision tower + embedding injection + M-RoPE decoder) with transformers.

For one image, several images of different sizes and a video, on both tiny checkpoints: both
models get the same pixel values and grids (from transformers' processor); Glimpse builds its
prompt ids, placeholder spans and 3-D positions with its own processor. Logits must agree to
max |diff| <= 1e-5 in float32 (observed ~4e-7), and an 8-token greedy continuation after two
images (positions shifted by ``rope_delta``) must equal ``generate``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from models.glm4v.loader import load_model
from models.glm4v.processing import MultimodalProcessor, positions_after
from models.layers.attention import AttentionMetadata

TOL = 1e-5  # observed ~4e-7 on logits of magnitude ~0.7
QUESTION = "What is in these?"


def _drawn_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 1)), int(rng.integers(0, h - 1))
        box = (x0, y0, int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1)))
        draw.rectangle(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


def _encoded_video(seconds: float = 3.4, fps: int = 12, w: int = 64, h: int = 48) -> bytes:
    import av  # PyAV only where a test encodes a video

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(int(seconds * fps)):
            img = Image.new("RGB", (w, h), (i * 9 % 256, 40, 200 - i * 3 % 200))
            ImageDraw.Draw(img).ellipse((i % w, 5, i % w + 20, 30), fill=(255, 255, 0))
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


class Case:
    """One prompt with media, prepared for both models."""

    def __init__(self, ckpt: Path, kinds: list[str], tmp_path: Path) -> None:
        from transformers import AutoProcessor
        from transformers.video_utils import VideoMetadata, load_video

        hf_proc = AutoProcessor.from_pretrained(ckpt)
        ours = MultimodalProcessor.from_pretrained(ckpt)
        parts = [{"type": k} for k in kinds] + [{"type": "text", "text": QUESTION}]
        hf_text = hf_proc.apply_chat_template(
            [{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=False
        )
        kwargs, media = {}, []
        images = [_drawn_image(90 + 70 * i, 120 - 20 * i, i) for i in range(kinds.count("image"))]
        if images:
            kwargs["images"] = images
            media = [ours.preprocess_image(img) for img in images]
        if "video" in kinds:
            data = _encoded_video()
            (tmp_path / "clip.mp4").write_bytes(data)
            frames, meta = load_video(str(tmp_path / "clip.mp4"), backend="pyav")
            kwargs["videos"] = [frames]
            kwargs["video_metadata"] = [
                VideoMetadata(
                    total_num_frames=meta.total_num_frames, fps=meta.fps, duration=meta.duration
                )
            ]
            media = [ours.video_from_bytes(data)]
        self.hf_inputs = hf_proc(text=[hf_text], return_tensors="pt", **kwargs)
        self.pixels = self.hf_inputs.get("pixel_values", self.hf_inputs.get("pixel_values_videos"))
        grid = self.hf_inputs.get("image_grid_thw", self.hf_inputs.get("video_grid_thw"))
        self.grid = grid
        url = {"url": "https://example.invalid/x"}
        our_parts = [{"type": f"{k}_url", f"{k}_url": url} for k in kinds]
        our_parts.append({"type": "text", "text": QUESTION})
        processed = ours.process([{"role": "user", "content": our_parts}], media)
        self.input_ids = torch.tensor(processed.tokens.token_ids)
        self.positions = processed.rope.positions
        self.rope_delta = processed.rope.rope_delta
        self.image_token_id = ours.expander.ids.image


@pytest.fixture(scope="module", params=["tiny_ckpt_45", "tiny_ckpt_46"])
def models(request: pytest.FixtureRequest):
    from transformers import Glm4vMoeForConditionalGeneration

    ckpt = request.getfixturevalue(request.param)
    hf = Glm4vMoeForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    ours = load_model(ckpt, dtype=torch.float32, device="cpu")
    return ckpt, hf, ours


def _our_logits(ours, case: Case) -> torch.Tensor:
    mm_embeds = ours.visual(case.pixels, case.grid)
    mm_mask = case.input_ids == case.image_token_id
    n = len(case.input_ids)
    hidden = ours(
        case.input_ids,
        case.positions,
        AttentionMetadata.prefill([n], case.input_ids.device),
        mm_embeds,
        mm_mask,
    )
    return ours.compute_logits(hidden)


@pytest.mark.parametrize("kinds", [["image"], ["image", "image", "image"], ["video"]])
@torch.inference_mode()
def test_logits_match_transformers(models, kinds: list[str], tmp_path: Path) -> None:
    ckpt, hf, ours = models
    case = Case(ckpt, kinds, tmp_path)
    assert case.input_ids.tolist() == case.hf_inputs["input_ids"][0].tolist()
    assert int((case.input_ids == case.image_token_id).sum()) > 0
    ref = hf(**case.hf_inputs).logits[0]
    logits = _our_logits(ours, case)
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max().item() <= TOL
    # the pixels matter: other pixels give other logits at the last position
    case.pixels = case.pixels.flip(0)
    assert not torch.allclose(_our_logits(ours, case)[-1], logits[-1], atol=1e-3)


@torch.inference_mode()
def test_greedy_after_image_matches_generate(models, tmp_path: Path) -> None:
    ckpt, hf, ours = models
    case = Case(ckpt, ["image", "image"], tmp_path)
    n, steps = len(case.input_ids), 8
    expected = hf.generate(**case.hf_inputs, max_new_tokens=steps, do_sample=False)[0, n:]
    ids = case.input_ids
    positions = case.positions
    mm_embeds = ours.visual(case.pixels, case.grid)
    for _ in range(steps):
        # cache-free: the whole sequence again, new text tokens at index + rope_delta
        mm_mask = ids == case.image_token_id
        mm_mask[n:] = False
        meta = AttentionMetadata.prefill([len(ids)])
        hidden = ours(ids, positions, meta, mm_embeds, mm_mask)
        nxt = ours.compute_logits(hidden[-1:]).argmax(-1)
        ids = torch.cat([ids, nxt])
        extra = positions_after(len(ids) - 1, 1, case.rope_delta)
        positions = torch.cat([positions, extra], dim=1)
    assert ids[n:].tolist() == expected.tolist()


def _to_cuda(case: Case) -> Case:
    case.hf_inputs = {k: v.cuda() for k, v in case.hf_inputs.items()}
    case.pixels, case.grid = case.pixels.cuda(), case.grid.cuda()
    case.input_ids, case.positions = case.input_ids.cuda(), case.positions.cuda()
    return case


# bf16 on CUDA: Glimpse must stay as close to transformers' float32 logits as transformers' own
# bf16 run does (within 2x, floor 3e-2), and within BF16_TOL of transformers' bf16 logits.
BF16_TOL = 6e-2


@pytest.mark.gpu
@pytest.mark.parametrize("ckpt_name", ["tiny_ckpt_45", "tiny_ckpt_46"])
@pytest.mark.parametrize("kinds", [["text"], ["image", "image", "image"], ["video"]])
@torch.inference_mode()
def test_cuda_bf16_logits_match_transformers(
    request: pytest.FixtureRequest, ckpt_name: str, kinds: list[str], tmp_path: Path
) -> None:
    from transformers import Glm4vMoeForConditionalGeneration

    ckpt = request.getfixturevalue(ckpt_name)
    media = [] if kinds == ["text"] else kinds
    case = _to_cuda(Case(ckpt, media, tmp_path)) if media else None
    refs = {}
    for dtype in (torch.float32, torch.bfloat16):
        hf = Glm4vMoeForConditionalGeneration.from_pretrained(ckpt, dtype=dtype).cuda().eval()
        if case is None:
            ids = torch.arange(3, 40, device="cuda")[None]
            refs[dtype] = hf(input_ids=ids).logits[0].float()
        else:
            refs[dtype] = hf(**case.hf_inputs).logits[0].float()
        del hf
    ours = load_model(ckpt, dtype=torch.bfloat16, device="cuda")
    if case is None:
        ids = torch.arange(3, 40, device="cuda")
        pos = torch.arange(len(ids), device="cuda").expand(3, -1)
        hidden = ours(ids, pos, AttentionMetadata.prefill([len(ids)], "cuda"), None, None)
        logits = ours.compute_logits(hidden).float()
    else:
        logits = _our_logits(ours, case).float()
    err_ours = (logits - refs[torch.float32]).abs().max().item()
    err_hf = (refs[torch.bfloat16] - refs[torch.float32]).abs().max().item()
    assert err_ours <= max(2 * err_hf, 3e-2), (err_ours, err_hf)
    assert (logits - refs[torch.bfloat16]).abs().max().item() <= BF16_TOL
