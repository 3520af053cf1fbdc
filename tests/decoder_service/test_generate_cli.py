"""``glimpse generate`` end to end: our processor, vision tower and engine vs transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_reference import draw_image, write_video

from glimpse.cli import main

REPO = Path(__file__).resolve().parents[2]


def hf_greedy(reference, parts: list[dict], media_kwargs: dict, max_new_tokens: int):
    messages = [{"role": "user", "content": parts}]
    text = reference.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    enc = dict(reference.processor(text=[text], return_tensors="pt", **media_kwargs))
    enc.pop("attention_mask", None)
    with torch.no_grad():
        out = reference.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    prompt = enc["input_ids"][0].tolist()
    return prompt, out[0, len(prompt) :].tolist()


def test_generate_with_an_image_matches_transformers(tiny_ckpt_45, reference, tmp_path):
    from PIL import Image

    path = tmp_path / "picture.png"
    draw_image(120, 80, seed=3).save(path)
    cmd = [
        sys.executable,
        "-m",
        "glimpse.cli",
        "generate",
        "--model-path",
        str(tiny_ckpt_45),
        "--prompt",
        "What is in the picture?",
        "--image",
        str(path),
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--num-blocks",
        "64",
        "--output-format",
        "json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny matmuls: threads only contend
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    parts = [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]
    prompt, tokens = hf_greedy(reference, parts, {"images": [Image.open(path)]}, 6)
    assert result["prompt_token_ids"] == prompt
    assert result["token_ids"] == tokens
    assert result["text"] == reference.processor.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.mark.parametrize("variant", ["glm4.5v", "glm4.6v"])
def test_generate_with_a_video_matches_transformers(request, variant, tmp_path, capsys):
    from transformers.video_utils import load_video

    suffix = "45" if variant == "glm4.5v" else "46"
    ckpt = request.getfixturevalue(f"tiny_ckpt_{suffix}")
    reference = request.getfixturevalue("reference" if suffix == "45" else "reference_46")
    path = write_video(tmp_path / "clip.mp4", frames=12, fps=6)
    rc = main(
        [
            "generate",
            "--model-path",
            str(ckpt),
            "--prompt",
            "Describe the clip.",
            "--video",
            str(path),
            "--max-tokens",
            "5",
            "--temperature",
            "0",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--num-blocks",
            "64",
            "--output-format",
            "json",
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    frames, meta = load_video(str(path), backend="pyav")
    parts = [{"type": "video"}, {"type": "text", "text": "Describe the clip."}]
    media = {"videos": [frames], "video_metadata": [meta]}
    prompt, tokens = hf_greedy(reference, parts, media, 5)
    assert result["prompt_token_ids"] == prompt
    assert result["token_ids"] == tokens


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "/nonexistent/picture.png"], "picture.png"),
        (["--temperature", "-1"], "temperature"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--max-model-len", "8"], "max_model_len"),
        (["--image", "{png}", "--image", "{png}", "--limit-mm-per-prompt", "image=1"], "limit"),
        (["--max-tokens", "1000", "--num-blocks", "4"], "KV blocks"),
    ],
)
def test_bad_input_exits_with_status_2(tiny_ckpt_45, tmp_path, capsys, extra, message):
    png = tmp_path / "p.png"
    draw_image(60, 60, seed=1).save(png)
    extra = [a.format(png=png) for a in extra]
    rc = main(
        [
            "generate",
            "--model-path",
            str(tiny_ckpt_45),
            "--prompt",
            "hi",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--num-blocks",
            "16",
            *extra,
        ]
    )
    assert rc == 2
    assert message in capsys.readouterr().err


def _generate_json(ckpt, *extra: str, capsys) -> tuple[int, list[dict], str]:
    base = ["generate", "--model-path", str(ckpt), "--max-tokens", "5", "--temperature", "0"]
    base += ["--dtype", "float32", "--device", "cpu", "--num-blocks", "64"]
    rc = main([*base, "--output-format", "json", *extra])
    out = capsys.readouterr()
    return rc, [json.loads(line) for line in out.out.splitlines() if line.strip()], out.err


def test_requests_file_answers_each_request_as_it_would_alone(tiny_ckpt_45, tmp_path, capsys):
    pictures = []
    for seed in (4, 5):
        pictures.append(tmp_path / f"p{seed}.png")
        draw_image(90 + 10 * seed, 70, seed=seed).save(pictures[-1])
    clip = write_video(tmp_path / "clip.mp4", frames=8, fps=4)
    requests = [
        {"id": "first", "prompt": "What is in the picture?", "images": [str(pictures[0])]},
        {"prompt": "Just text, no media."},
        {"id": "clip", "prompt": "Describe the clip.", "videos": [str(clip)]},
        {"id": "two", "prompt": "Compare them.", "images": [str(p) for p in pictures]},
    ]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in requests) + "\n\n")
    rc, batched, err = _generate_json(tiny_ckpt_45, "--requests", str(path), capsys=capsys)
    assert rc == 0, err
    assert [b["id"] for b in batched] == ["first", "1", "clip", "two"]
    for request, got in zip(requests, batched, strict=True):
        flags = ["--prompt", request["prompt"]]
        flags += [f for p in request.get("images", []) for f in ("--image", p)]
        flags += [f for p in request.get("videos", []) for f in ("--video", p)]
        rc, (alone,), err = _generate_json(tiny_ckpt_45, *flags, capsys=capsys)
        assert rc == 0, err
        assert got["prompt_token_ids"] == alone["prompt_token_ids"]
        assert got["token_ids"] == alone["token_ids"]
        assert got["text"] == alone["text"]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"prompt": "ok"}', "not json"], "requests.jsonl:2: not JSON"),
        (['{"prompt": 3}'], 'string "prompt"'),
        (['{"prompt": "a", "images": "one.png"}'], '"images" must be a list'),
        (['{"prompt": "a", "image": ["one.png"]}'], "unknown keys ['image']"),
        (['{"id": "x", "prompt": "a"}', '{"id": "x", "prompt": "b"}'], "duplicate id 'x'"),
        (["", "  "], "no requests"),
        (
            ['{"prompt": "a"}', '{"id": "b", "prompt": "b", "images": ["/nonexistent/q.png"]}'],
            "request 'b': ",
        ),
    ],
)
def test_bad_requests_file_exits_with_status_2(tiny_ckpt_45, tmp_path, capsys, lines, message):
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rc, out, err = _generate_json(tiny_ckpt_45, "--requests", str(path), capsys=capsys)
    assert rc == 2 and not out
    assert message in err


def test_requests_file_excludes_the_single_prompt_flags(tiny_ckpt_45, tmp_path, capsys):
    path = tmp_path / "requests.jsonl"
    path.write_text('{"prompt": "a"}\n')
    rc, _, err = _generate_json(
        tiny_ckpt_45, "--requests", str(path), "--prompt", "b", capsys=capsys
    )
    assert rc == 2 and "--requests replaces --prompt" in err
    rc, _, err = _generate_json(tiny_ckpt_45, capsys=capsys)
    assert rc == 2 and "--prompt" in err
