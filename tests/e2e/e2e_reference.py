"""transformers' greedy ``generate`` on the same checkpoint: the answer the server must give.

``HFReference(ckpt).greedy(parts, max_new_tokens)`` takes chat content in order ("text", str),
("image", PIL image) or ("video", path), renders it with transformers' own processor and chat
template, and returns the prompt length and the generated ids cut after the first EOS, plus the
text a client should see (the EOS token's text excluded, special tokens kept, as the gateway asks
the decoder when its parsers are on).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch


class Greedy(NamedTuple):
    prompt_tokens: int
    token_ids: list[int]  # generated, up to and including an EOS
    text: str  # what a client sees: special tokens kept, the final EOS dropped
    stopped: bool  # ended on EOS (finish_reason "stop") rather than the length limit


class HFReference:
    def __init__(self, ckpt: Path) -> None:
        from tokenizers import Tokenizer
        from transformers import AutoModelForImageTextToText, AutoProcessor

        # the raw tokenizer decodes without transformers' clean-up, as a streaming server must
        self.tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
        self.processor = AutoProcessor.from_pretrained(ckpt)
        self.model = AutoModelForImageTextToText.from_pretrained(ckpt, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])

    def greedy(self, parts: list[tuple[str, Any]], max_new_tokens: int) -> Greedy:
        from transformers.video_utils import load_video

        content, images, videos, metas = [], [], [], []
        for kind, value in parts:
            if kind == "text":
                content.append({"type": "text", "text": value})
            elif kind == "image":
                content.append({"type": "image"})
                images.append(value)
            else:
                content.append({"type": "video"})
                frames, meta = load_video(str(value), backend="pyav")
                videos.append(frames)
                metas.append(meta)
        text = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs |= {"videos": videos, "video_metadata": metas}
        enc = dict(self.processor(**kwargs))
        enc.pop("attention_mask", None)
        prompt = enc["input_ids"].shape[1]
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        ids = out[0, prompt:].tolist()
        cut = next((i + 1 for i, t in enumerate(ids) if t in self.eos), len(ids))
        ids = ids[:cut]
        stopped = bool(ids) and ids[-1] in self.eos
        shown = ids[:-1] if stopped else ids
        decoded = self.tokenizer.decode(shown, skip_special_tokens=False)
        return Greedy(prompt, ids, decoded, stopped)
