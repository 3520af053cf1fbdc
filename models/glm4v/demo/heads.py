"""Training-only heads of the demo model and its accuracy counters.

Contract: ``AuxHeads.loss(feats, grid, aux, tokens)`` supervises the vision tower's merged
output directly (what was drawn, where, and which shape / colour lies under every token) and
returns the loss with (right, total) counters; ``answer_hits`` counts answers right under
teacher forcing. The heads are never saved with the checkpoint.
Not here: data, the training loop.
"""

from __future__ import annotations

import torch

from models.glm4v.demo import scenes

# the (right, total) counters ``AuxHeads.loss`` returns, by name
HEAD_NAMES = ("token_shape", "token_color", "shape", "color", "count", "motion")


def ratio(v: torch.Tensor) -> float:
    """right / total of one counter (nan when nothing was counted)."""
    right, total = v.tolist()
    return right / total if total else float("nan")


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
        pooled, motion_in = _pool(feats.float(), grid)
        out = self.image(pooled)
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
            motion = self.motion(motion_in)
            loss = loss + f.cross_entropy(motion, lab[:, 3])
            hits["motion"] = _hits(motion, lab[:, 3])
        return torch.nan_to_num(loss), hits


def _pool(feats: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item: the mean of its merged tokens [B, H], and its first and last frame groups'
    means side by side [B, 2H]; a fixed handful of ops whatever the batch size."""
    sizes = grid.prod(-1) // 4  # merged tokens per item
    per_group = sizes // grid[:, 0]
    item = torch.repeat_interleave(torch.arange(len(sizes), device=feats.device), sizes)
    start = torch.cumsum(sizes, 0) - sizes
    pos = torch.arange(feats.shape[0], device=feats.device) - start[item]  # index in its item

    def mean_over(rows: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        total = feats.new_zeros(len(sizes), feats.shape[1]).index_add_(0, item[rows], feats[rows])
        return total / count[:, None].to(feats.dtype)

    pooled = feats.new_zeros(len(sizes), feats.shape[1]).index_add_(0, item, feats)
    first = mean_over(pos < per_group[item], per_group)
    last = mean_over(pos >= (sizes - per_group)[item], per_group)
    return pooled / sizes[:, None].to(feats.dtype), torch.cat([first, last], dim=1)


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
