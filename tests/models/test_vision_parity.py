"""Vision tower parity with transformers' ``model.visual`` on the tiny GLM-4.5V checkpoint.

Both towers run in float32 on the same checkpoint tensors and the same preprocessed pixels; the
merger output (transformers' ``pooler_output``) must agree to 1e-4 relative to its scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.glm4v.config import load_model_config
from models.glm4v.processing import MultimodalProcessor
from models.glm4v.vision import VisionTower

TOL = 1e-4  # max abs error / max abs value, float32


@pytest.fixture(scope="module")
def towers(tiny_ckpt_45):
    from transformers import Glm4vMoeForConditionalGeneration

    hf = Glm4vMoeForConditionalGeneration.from_pretrained(tiny_ckpt_45, dtype=torch.float32)
    ours = VisionTower(load_model_config(tiny_ckpt_45).vision)
    prefix = "model.visual."
    weights = load_file(str(tiny_ckpt_45 / "model.safetensors"))
    visual = {k[len(prefix) :]: v.float() for k, v in weights.items() if k.startswith(prefix)}
    ours.load_state_dict(visual, strict=True)  # every name matches, nothing left over
    return hf.model.eval(), ours.eval()


@pytest.fixture(scope="module")
def processor(tiny_ckpt_45):
    return MultimodalProcessor.from_pretrained(tiny_ckpt_45)


def _image(h: int, w: int, seed: int):
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


def _close(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


@torch.no_grad()
def test_images_of_several_sizes_match_reference_in_one_batch(towers, processor):
    hf_model, ours = towers
    items = [
        processor.preprocess_image(_image(h, w, i))
        for i, (h, w) in enumerate([(56, 56), (120, 300), (333, 111), (500, 480)])
    ]
    pixels = torch.cat([it.pixel_values for it in items])
    grid = torch.tensor([it.grid_thw for it in items])
    ref = torch.cat(hf_model.get_image_features(pixels, image_grid_thw=grid).pooler_output)
    out = ours(pixels, grid)
    assert out.shape == (sum(it.num_tokens for it in items), ours.cfg.out_hidden_size)
    assert _close(out, ref) < TOL


@torch.no_grad()
def test_video_matches_reference_and_attends_per_frame_group(towers, processor):
    hf_model, ours = towers
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (90, 120, 3), dtype=np.uint8) for _ in range(6)]
    video = processor.preprocess_video(frames, list(range(6)), fps=2.0)
    grid = torch.tensor([video.grid_thw])
    assert video.grid_thw[0] == 3
    ref = torch.cat(
        hf_model.get_video_features(video.pixel_values, video_grid_thw=grid).pooler_output
    )
    out = ours(video.pixel_values, grid)  # one row per video: the tower splits it per frame group
    assert _close(out, ref) < TOL

    # changing only the last frame pair leaves the first groups' embeddings untouched
    altered = video.pixel_values.clone()
    per_group = video.grid_thw[1] * video.grid_thw[2]
    altered[-per_group:] += 1.0
    out2 = ours(altered, grid)
    kept = video.num_tokens - video.tokens_per_frame
    assert torch.equal(out2[:kept], out[:kept])
    assert not torch.allclose(out2[kept:], out[kept:])


@torch.no_grad()
def test_images_in_one_batch_do_not_see_each_other(towers, processor):
    _, ours = towers
    a = processor.preprocess_image(_image(100, 140, 5))
    b = processor.preprocess_image(_image(140, 100, 6))
    grid = torch.tensor([a.grid_thw, b.grid_thw])
    together = ours(torch.cat([a.pixel_values, b.pixel_values]), grid)
    alone = ours(a.pixel_values, torch.tensor([a.grid_thw]))
    assert _close(together[: a.num_tokens], alone) < 1e-5


def test_padded_attention_equals_per_segment_attention_with_gradients(towers, processor):
    """The training path (one masked SDPA over padded segments) computes what the per-segment
    loop does, forward and backward, for images and a video's frame groups mixed in one batch."""
    _, ours = towers
    rng = np.random.default_rng(2)
    items = [
        processor.preprocess_image(_image(h, w, i))
        for i, (h, w) in enumerate([(60, 90), (200, 140)])
    ]
    frames = [rng.integers(0, 256, (84, 112, 3), dtype=np.uint8) for _ in range(4)]
    items.append(processor.preprocess_video(frames, list(range(4)), fps=2.0))
    pixels = torch.cat([it.pixel_values for it in items])
    grid = torch.tensor([it.grid_thw for it in items])
    results = []
    for padded in (False, True):
        ours.zero_grad()
        ours.padded_attention = padded
        try:
            out = ours(pixels, grid)
        finally:
            ours.padded_attention = False
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results.append((out.detach(), ours.blocks[0].attn.qkv.weight.grad.clone()))
    (loop_out, loop_grad), (pad_out, pad_grad) = results
    assert _close(pad_out, loop_out) < 1e-5
    assert _close(pad_grad, loop_grad) < 1e-4
    ours.zero_grad()


def test_patch_count_mismatch_is_refused(towers):
    _, ours = towers
    with pytest.raises(ValueError, match="patches"):
        ours(torch.zeros(8, ours.cfg.patch_dim), torch.tensor([[1, 4, 4]]))


@pytest.mark.gpu
@torch.no_grad()
def test_bf16_on_gpu_tracks_float32(towers, processor):
    _, ours = towers
    item = processor.preprocess_image(_image(200, 260, 7))
    grid = torch.tensor([item.grid_thw])
    ref = ours(item.pixel_values, grid)
    gpu = VisionTower(ours.cfg).to("cuda", torch.bfloat16)
    gpu.load_state_dict(ours.state_dict())
    out = gpu(item.pixel_values.cuda(), grid.cuda()).float().cpu()
    assert gpu.dtype == torch.bfloat16 and gpu.device.type == "cuda"
    assert _close(out, ref) < 5e-2


@torch.no_grad()
def test_equal_images_in_one_batched_call_match_reference_and_each_alone(towers, processor):
    """Same-sized images take the one batched SDPA call; each must still equal transformers
    and its own single-image run."""
    hf, ours = towers
    items = [processor.preprocess_image(_image(112, 168, 20 + i)) for i in range(3)]
    pixels = torch.cat([it.pixel_values for it in items])
    grid = torch.tensor([it.grid_thw for it in items])
    together = ours(pixels, grid)
    assert _close(together, hf.visual(pixels, grid_thw=grid).pooler_output) < TOL
    n = items[0].num_tokens
    for i, it in enumerate(items):
        alone = ours(it.pixel_values, torch.tensor([it.grid_thw]))
        assert _close(together[i * n : (i + 1) * n], alone) < 1e-5


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_kernels_equal_the_torch_ops_in_bf16(towers, processor, monkeypatch):
    """The Triton rotary / norm / SiLU kernels and the batched attention against the same
    tower with Triton off, on equal and mixed image sizes."""
    from kernels import dispatch

    _, ours = towers
    gpu = VisionTower(ours.cfg).to("cuda", torch.bfloat16)
    gpu.load_state_dict(ours.state_dict())
    sizes = [[(112, 168)] * 3, [(112, 168), (200, 140)]]
    for shape in sizes:
        items = [processor.preprocess_image(_image(h, w, i)) for i, (h, w) in enumerate(shape)]
        pixels = torch.cat([it.pixel_values for it in items]).cuda()
        grid = torch.tensor([it.grid_thw for it in items]).cuda()
        fast = gpu(pixels, grid).float()
        monkeypatch.setattr(dispatch, "TRITON_DISABLED", True)
        plain = gpu(pixels, grid).float()
        monkeypatch.setattr(dispatch, "TRITON_DISABLED", False)
        assert _close(fast, plain) < 2e-2
        assert not torch.equal(fast, torch.zeros_like(fast))
