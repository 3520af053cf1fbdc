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
