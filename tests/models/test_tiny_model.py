"""The tiny checkpoint loads and runs in transformers, and its tokenizer and template behave.

Checked against transformers itself (processor / model classes, load report, generate) and
against properties stated in the model spec (special tokens, template layout); nothing here
compares with output recorded from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from models.glm4v.config import load_model_config
from models.glm4v.tiny import write_tiny_checkpoint
from models.glm4v.tokenizer_build import GLM_SPECIAL_TOKENS

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "glm4.5v": ("Glm4vProcessor", "Glm4vVideoProcessor", 10000.0, "4.57.1"),
    "glm4.6v": ("Glm46VProcessor", "Glm46VVideoProcessor", 500000.0, "5.0.0"),
}


@pytest.fixture(params=sorted(VARIANTS), scope="module")
def ckpt(request, tiny_ckpt_45: Path, tiny_ckpt_46: Path) -> tuple[str, Path]:
    return request.param, tiny_ckpt_45 if request.param == "glm4.5v" else tiny_ckpt_46


@pytest.fixture(scope="module")
def loaded(ckpt):
    variant, path = ckpt
    processor = transformers.AutoProcessor.from_pretrained(path)
    model, info = transformers.Glm4vMoeForConditionalGeneration.from_pretrained(
        path, output_loading_info=True
    )
    return variant, path, processor, model.eval(), info


def _picture() -> Image.Image:
    img = Image.new("RGB", (96, 64), (240, 240, 240))
    draw = ImageDraw.Draw(img)
    draw.rectangle((8, 8, 40, 40), fill=(200, 20, 20))
    draw.ellipse((50, 20, 90, 60), fill=(20, 160, 40))
    return img


def test_processor_classes_match_variant(loaded):
    variant, _, processor, _, _ = loaded
    proc_cls, video_cls, _, _ = VARIANTS[variant]
    assert type(processor).__name__ == proc_cls
    assert type(processor.video_processor).__name__ == video_cls
    assert type(processor.image_processor).__name__.startswith("Glm4vImageProcessor")


def test_config_format_and_token_ids(loaded):
    variant, path, processor, model, _ = loaded
    _, _, theta, version = VARIANTS[variant]
    raw = json.loads((path / "config.json").read_text())
    assert raw["transformers_version"] == version
    text = raw["text_config"]
    assert ("rope_scaling" in text) == (variant == "glm4.5v")
    assert ("rope_parameters" in text) == (variant == "glm4.6v")
    # transformers and the project's own parser read the same rope settings.
    rope = model.config.text_config.rope_parameters
    ours = load_model_config(path)
    assert rope["rope_theta"] == ours.text.rope_theta == theta
    assert list(rope["mrope_section"]) == list(ours.text.mrope_section) == [2, 1, 1]
    assert ours.text.rotary_dim == 8 and ours.text.head_dim == 16
    tok = processor.tokenizer
    for key, token in [
        ("image_token_id", "<|image|>"),
        ("video_token_id", "<|video|>"),
        ("image_start_token_id", "<|begin_of_image|>"),
        ("image_end_token_id", "<|end_of_image|>"),
        ("video_start_token_id", "<|begin_of_video|>"),
        ("video_end_token_id", "<|end_of_video|>"),
    ]:
        assert getattr(model.config, key) == tok.convert_tokens_to_ids(token)
    vocab = model.config.text_config.vocab_size
    assert vocab % 64 == 0 and len(tok) <= vocab < len(tok) + 64
    gen = json.loads((path / "generation_config.json").read_text())
    stops = ["<|endoftext|>", "<|user|>", "<|observation|>"]
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids(stops)


def test_every_model_tensor_comes_from_the_file(loaded):
    _, path, _, model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"] and not info["error_msgs"]
    stored = load_file(str(path / "model.safetensors"))
    bias = [k for k in stored if k.endswith("e_score_correction_bias")]
    assert bias and all(stored[k].dtype == torch.float32 for k in bias)
    for name, value in model.state_dict().items():
        if ".mlp.experts." in name:
            # transformers fuses per-expert weights: gate_up [E, 2I, H], down [E, H, I].
            prefix, kind = name.rsplit(".", 1)[0], name.rsplit(".", 1)[1]
            n = model.config.text_config.n_routed_experts
            if kind == "gate_up_proj":
                parts = [
                    torch.cat(
                        [
                            stored[f"{prefix}.{e}.gate_proj.weight"],
                            stored[f"{prefix}.{e}.up_proj.weight"],
                        ]
                    )
                    for e in range(n)
                ]
            else:
                parts = [stored[f"{prefix}.{e}.down_proj.weight"] for e in range(n)]
            expected = torch.stack(parts)
        else:
            expected = stored[name]
        assert torch.equal(value.to(expected.dtype), expected), name
        assert value.abs().sum() > 0, f"{name} is all zeros"


def test_generate_with_an_image(loaded):
    _, _, processor, model, _ = loaded
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": _picture()}, {"type": "text", "text": "What?"}],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ids = inputs["input_ids"][0]
    n_image = int((ids == model.config.image_token_id).sum())
    assert n_image == int(inputs["image_grid_thw"].prod()) // 4
    assert 4 <= n_image <= 64  # the small pixel budget keeps images cheap
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = out[0, ids.shape[0] :]
    assert 1 <= new.numel() <= 4
    assert int(new.max()) < model.config.text_config.vocab_size


def test_tokenizer_round_trip_and_special_tokens(loaded):
    _, _, processor, _, _ = loaded
    tok = processor.tokenizer
    assert 600 <= len(tok) <= 2000
    for text in [
        "Hello, world! 123",
        "def f(x):\n    return x",
        "图片里有一只猫。",
        "naïve café ∑",
    ]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    special_ids = [tok.convert_tokens_to_ids(t) for t in GLM_SPECIAL_TOKENS]
    # One id each, in the GLM order, after the learned BPE part.
    assert special_ids == list(range(special_ids[0], special_ids[0] + len(GLM_SPECIAL_TOKENS)))
    for token, tid in zip(GLM_SPECIAL_TOKENS, special_ids, strict=True):
        assert tok.encode(f"a{token}b", add_special_tokens=False)[1:-1] == [tid], token
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny_ckpt_45):
    again = write_tiny_checkpoint(tmp_path / "again", seed=0, variant="glm4.5v")
    for f in sorted(p.name for p in tiny_ckpt_45.iterdir()):
        assert (again / f).read_bytes() == (tiny_ckpt_45 / f).read_bytes(), f
    other = write_tiny_checkpoint(tmp_path / "other", seed=1, variant="glm4.5v")
    a = load_file(str(tiny_ckpt_45 / "model.safetensors"))
    b = load_file(str(other / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(not torch.equal(a[k], b[k]) for k in a)
    assert (other / "tokenizer.json").read_bytes() == (tiny_ckpt_45 / "tokenizer.json").read_bytes()


def test_sharded_checkpoint_holds_the_same_weights(tmp_path, tiny_ckpt_46):
    path = write_tiny_checkpoint(tmp_path / "sharded", seed=0, variant="glm4.6v", num_shards=3)
    assert not (path / "model.safetensors").exists()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 3
    merged = {}
    for f in files:
        part = load_file(str(path / f))
        assert all(index["weight_map"][k] == f for k in part)
        merged |= part
    single = load_file(str(tiny_ckpt_46 / "model.safetensors"))
    assert merged.keys() == single.keys() == index["weight_map"].keys()
    assert all(torch.equal(merged[k], single[k]) for k in single)
    _, info = transformers.Glm4vMoeForConditionalGeneration.from_pretrained(
        path, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_unknown_variant_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="variant"):
        write_tiny_checkpoint(tmp_path, variant="glm5")


def test_video_prompt_and_generate(loaded, tmp_path):
    av = pytest.importorskip("av")
    from transformers.video_utils import load_video

    variant, _, processor, model, _ = loaded
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            frame = np.zeros((48, 64, 3), np.uint8)
            frame[:, i * 3 : i * 3 + 8] = (255, 0, 0)  # a bar moving right
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    frames, meta = load_video(str(path), backend="pyav")
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|begin_of_video|><|video|><|end_of_video|>" in text
    inputs = processor(text=[text], videos=[frames], video_metadata=[meta], return_tensors="pt")
    t, h, w = (int(x) for x in inputs["video_grid_thw"][0])
    decoded = processor.tokenizer.decode(inputs["input_ids"][0])
    # One image-delimited group per temporal patch, each followed by its timestamp text.
    assert decoded.count("<|begin_of_image|>") == t and "<|video|>" not in decoded
    assert ("seconds" in decoded) == (variant == "glm4.6v")
    assert t * h * w // 4 <= 64  # the small video budget keeps clips cheap
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


# ---- chat template -------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {
        "role": "user",
        "content": [{"type": "image", "url": "a.png"}, {"type": "text", "text": "Weather here?"}],
    },
    {
        "role": "assistant",
        "content": "<think>old reasoning</think>Checking.",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}},
            }
        ],
    },
    {"role": "tool", "content": "sunny"},
    {
        "role": "tool",
        "content": [{"type": "text", "text": "map:"}, {"type": "image", "url": "m.png"}],
    },
    {"role": "assistant", "content": "Sunny.", "reasoning_content": "also old"},
    {
        "role": "user",
        "content": [
            {"type": "video_url", "video_url": {"url": "v.mp4"}},
            {"type": "image_url", "image_url": {"url": "b.png"}},
            {"type": "text", "text": "And these?"},
        ],
    },
    {"role": "assistant", "content": "A clip and a photo.", "reasoning_content": "fresh thought"},
]


def _plain_jinja(path: Path, trim: bool, **kwargs) -> str:
    env = jinja2.Environment(trim_blocks=trim, lstrip_blocks=trim)
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)
    template = env.from_string((path / "chat_template.jinja").read_text())
    return template.render(messages=CONVERSATION, tools=TOOLS, **kwargs)


@pytest.mark.parametrize("thinking", [True, False])
def test_template_same_in_transformers_and_plain_jinja(loaded, thinking):
    _, path, processor, _, _ = loaded
    kwargs = {"add_generation_prompt": True, "enable_thinking": thinking}
    hf = processor.apply_chat_template(CONVERSATION, tools=TOOLS, tokenize=False, **kwargs)
    assert hf == processor.tokenizer.apply_chat_template(
        CONVERSATION, tools=TOOLS, tokenize=False, **kwargs
    )
    assert hf == _plain_jinja(path, True, **kwargs) == _plain_jinja(path, False, **kwargs)


def test_template_layout(tiny_ckpt_45):
    on = _plain_jinja(tiny_ckpt_45, True, add_generation_prompt=True)
    off = _plain_jinja(tiny_ckpt_45, True, add_generation_prompt=True, enable_thinking=False)
    assert on.startswith("[gMASK]<sop><|system|>\n# Tools") and on.endswith("<|assistant|>\n")
    assert json.dumps(TOOLS[0]) in on
    assert "<|system|>\nYou are helpful.<|user|>\n<|begin_of_image|><|image|><|end_of_image|>" in on
    assert on.count("<|begin_of_image|><|image|><|end_of_image|>") == 3
    assert on.count("<|begin_of_video|><|video|><|end_of_video|>") == 1
    # Tool calls in the layout the tool-call parser expects; non-string values as JSON.
    call = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>"
    assert call + "\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>" in on
    # Consecutive tool results share one observation turn.
    assert on.count("<|observation|>") == 1 and on.count("<tool_response>\n") == 2
    # Reasoning is kept only after the last user turn; older turns get an empty think block.
    assert "old reasoning" not in on and "also old" not in on
    assert "<|assistant|>\n<think>fresh thought</think>\nA clip and a photo." in on
    assert on.count("<|assistant|>\n<think></think>\n") == 2
    # Thinking off: every user turn ends in /nothink and the prompt closes the think block.
    assert off.count("/nothink<|assistant|>") == 2 and off.count("/nothink") == 2
    assert off.endswith("<|assistant|>\n<think></think>\n")
    plain = _plain_jinja(tiny_ckpt_45, True, add_generation_prompt=False)
    assert plain.endswith("A clip and a photo.")
