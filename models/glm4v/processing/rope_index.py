"""3-D (temporal, height, width) M-RoPE positions of a GLM-4.5V / GLM-4.6V prompt.

Contract: ``get_rope_index(num_tokens or token_ids, media)`` walks the prompt by segment. A running
position ``cur`` starts at 0. A text token gets (cur, cur, cur) and advances ``cur`` by 1. Each
``<|image|>`` run (an image, or one temporal patch of a video) with merged grid (h', w') gives the
token at merged row r, column c the position (cur, cur + r, cur + c), then advances ``cur`` by
max(h', w'). Runs come from the ``MediaSpans`` of every item, so images and videos mix freely in
one prompt (transformers needs ``mm_token_type_ids`` for that; the positions are the same).
``rope_delta = max position + 1 - num_tokens``; a token appended later at absolute index n
(decode, or a continuation with no new media) has position n + rope_delta in all three rows,
see ``positions_after``.

Not here: applying the rotary embedding (``models/layers/rotary.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from models.glm4v.processing.placeholders import MediaSpans


class RopeIndex(NamedTuple):
    positions: torch.Tensor  # [3, T] int64
    rope_delta: int


def get_rope_index(
    tokens: int | Sequence[int] | torch.Tensor,  # the prompt's token ids, or just their count
    media: Sequence[MediaSpans],
    merge_size: int = 2,
) -> RopeIndex:
    total = tokens if isinstance(tokens, int) else len(tokens)
    runs = sorted(
        (start, end, item.grid_thw[1] // merge_size, item.grid_thw[2] // merge_size)
        for item in media
        for start, end in item.spans
    )
    positions = torch.empty(3, total, dtype=torch.int64)
    cur = pos = 0
    for start, end, mh, mw in runs:
        if start < pos or end > total or end - start != mh * mw:
            raise ValueError(f"media run [{start}, {end}) does not fit a {mh}x{mw} grid here")
        positions[:, pos:start] = torch.arange(cur, cur + start - pos)
        cur += start - pos
        rows = torch.arange(mh).repeat_interleave(mw)
        cols = torch.arange(mw).repeat(mh)
        positions[0, start:end] = cur
        positions[1, start:end] = cur + rows
        positions[2, start:end] = cur + cols
        cur += max(mh, mw)
        pos = end
    positions[:, pos:] = torch.arange(cur, cur + total - pos)
    max_pos = int(positions.max()) if total else -1
    return RopeIndex(positions=positions, rope_delta=max_pos + 1 - total)


def positions_after(start: int, count: int, rope_delta: int) -> torch.Tensor:  # [3, count] int64
    """Positions of ``count`` text tokens at absolute indices start.. after the prompt."""
    return (torch.arange(start, start + count, dtype=torch.int64) + rope_delta).expand(3, -1)
