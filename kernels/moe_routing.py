"""GLM-4.5 MoE routing from router logits: sigmoid scores, biased group-limited top-k choice.

Contract: ``route_topk(logits, bias, top_k, n_group, topk_group, renormalize, scaling)`` takes
``logits [T, E]`` float32 and the ``e_score_correction_bias [E]`` float32 and returns
``TopKRoute(weights [T, K] float32, ids [T, K] ids_dtype)``:
1. ``scores = sigmoid(logits)``; ``choice = scores + bias`` (the bias only steers selection);
2. group limit: experts form ``n_group`` contiguous groups, a group's score is the sum of its two
   best ``choice`` values (its best alone for one-expert groups), and only the ``topk_group``
   best groups stay eligible (the others get ``-inf``);
3. ``ids`` = the ``top_k`` best eligible ``choice`` values (no guaranteed order between them);
4. ``weights`` = the *unbiased* ``scores`` at ``ids``, divided by their sum + 1e-20 when
   ``renormalize``, times ``scaling``.
``route_topk_reference`` is the torch definition (also the router layer's CPU path); the kernel
picks the same experts (exact ties aside) in descending ``choice`` order and matches its weights
to float32 rounding of the sum.

Kernel: one program per token keeps its ``E`` logits in registers as a ``[n_group, E/n_group]``
tile and extracts the maxima ``top_k`` times (lowest expert id on ties); grid = T, no host reads
(CUDA-graph safe). Needs Triton; on CPU it runs only under ``TRITON_INTERPRET=1`` (the tests).

What does not belong here: the router GEMM (the layer's), dispatching tokens to experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

try:  # optional: a CPU-only install may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

MAX_EXPERTS = 4096  # one token's logits must fit one program's registers


class TopKRoute(NamedTuple):
    weights: torch.Tensor  # [T, K] float32, renormalised unbiased scores x scaling
    ids: torch.Tensor  # [T, K] int64 (or int32 on request), global expert ids


def route_topk_reference(
    logits: torch.Tensor,  # [T, E] float32
    bias: torch.Tensor,  # [E] float32, e_score_correction_bias
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    scaling: float = 1.0,
) -> TopKRoute:  # ids int64
    scores = logits.sigmoid()
    choice = scores + bias
    if n_group > 1:
        choice = _limit_groups(choice, n_group, topk_group)
    ids = torch.topk(choice, top_k, dim=-1, sorted=False).indices  # [T, K]
    weights = scores.gather(1, ids)  # fresh: renormalised and scaled in place
    if renormalize:
        weights.div_(weights.sum(dim=-1, keepdim=True).add_(1e-20))
    if scaling != 1.0:  # x * 1.0 is x: skip the op
        weights.mul_(scaling)
    return TopKRoute(weights, ids)


def _limit_groups(choice: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    t = choice.shape[0]
    grouped = choice.view(t, n_group, -1)  # [T, G, E/G]
    top2 = min(2, grouped.shape[-1])
    group_scores = grouped.topk(top2, dim=-1).values.sum(dim=-1)  # [T, G]
    keep_groups = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
    keep = keep[:, :, None].expand_as(grouped).reshape(t, -1)
    return choice.masked_fill(~keep, float("-inf"))


def supported(logits: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> bool:
    """True when the kernel handles this routing problem (else use the reference)."""
    e = logits.shape[-1]
    return (
        triton is not None
        and logits.dim() == 2
        and logits.dtype == torch.float32
        and 0 < e <= MAX_EXPERTS
        and n_group >= 1
        and e % n_group == 0
        and 1 <= topk_group <= n_group
        and 1 <= top_k <= topk_group * (e // n_group)
    )


def route_topk(
    logits: torch.Tensor,  # [T, E] float32
    bias: torch.Tensor,  # [E] float32
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    renormalize: bool = True,
    scaling: float = 1.0,
    ids_dtype: torch.dtype = torch.int64,  # int64 or int32
) -> TopKRoute:
    if triton is None:
        raise RuntimeError("the routing kernel needs triton")
    if not supported(logits, n_group, topk_group, top_k):
        raise ValueError(
            f"routing kernel: logits {tuple(logits.shape)} {logits.dtype}, top_k {top_k}, "
            f"n_group {n_group}, topk_group {topk_group} (float32, groups must hold top_k)"
        )
    if bias.shape != (logits.shape[1],) or bias.dtype != torch.float32:
        raise ValueError(f"bias {tuple(bias.shape)} {bias.dtype} must be [E] float32")
    if ids_dtype not in (torch.int64, torch.int32):
        raise ValueError(f"ids_dtype {ids_dtype} must be int64 or int32")
    t, e = logits.shape
    weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(t, top_k, dtype=ids_dtype, device=logits.device)
    if t == 0:
        return TopKRoute(weights, ids)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    group_size = e // n_group
    _route_kernel[(t,)](
        logits, bias.contiguous(), weights, ids,
        logits.stride(0), scaling,
        N_GROUP=n_group, GROUP_SIZE=group_size,
        G_PAD=triton.next_power_of_2(n_group), S_PAD=triton.next_power_of_2(group_size),
        TOPK_GROUP=topk_group, TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k),
        RENORM=renormalize, num_warps=1 if e <= 256 else 4,
    )  # fmt: skip
    return TopKRoute(weights, ids)


if triton is not None:

    @triton.jit
    def _route_kernel(
        logits_ptr, bias_ptr, w_ptr, ids_ptr,
        stride_l, scaling,
        N_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, G_PAD: tl.constexpr,
        S_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr,
        K_PAD: tl.constexpr, RENORM: tl.constexpr,
    ):  # fmt: skip
        tok = tl.program_id(0).to(tl.int64)
        gi = tl.arange(0, G_PAD)
        si = tl.arange(0, S_PAD)
        valid = (gi < N_GROUP)[:, None] & (si < GROUP_SIZE)[None, :]
        expert = gi[:, None] * GROUP_SIZE + si[None, :]  # [G_PAD, S_PAD] global expert id
        n_experts: tl.constexpr = N_GROUP * GROUP_SIZE
        logit = tl.load(logits_ptr + tok * stride_l + expert, mask=valid, other=0.0)
        score = tl.sigmoid(logit)
        bias = tl.load(bias_ptr + expert, mask=valid, other=0.0)
        choice = tl.where(valid, score + bias, float("-inf"))
        if N_GROUP > 1:
            best1 = tl.max(choice, axis=1)  # [G_PAD]
            if GROUP_SIZE > 1:
                # drop one occurrence of the best, so a tied runner-up still counts
                first = tl.min(tl.where(choice == best1[:, None], si[None, :], S_PAD), axis=1)
                rest = tl.where(si[None, :] == first[:, None], float("-inf"), choice)
                group_score = best1 + tl.max(rest, axis=1)
            else:
                group_score = best1
            group_score = tl.where(gi < N_GROUP, group_score, float("-inf"))
            keep = gi < 0
            for _ in tl.static_range(TOPK_GROUP):
                top = tl.max(group_score, axis=0)
                pick = tl.min(tl.where(group_score == top, gi, G_PAD), axis=0)
                keep = keep | (gi == pick)
                group_score = tl.where(gi == pick, float("-inf"), group_score)
            choice = tl.where(keep[:, None], choice, float("-inf"))
        ki = tl.arange(0, K_PAD)
        ids = tl.zeros([K_PAD], dtype=tl.int32)
        wts = tl.zeros([K_PAD], dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            top = tl.max(tl.max(choice, axis=1), axis=0)
            pick = tl.min(tl.min(tl.where(choice == top, expert, n_experts), axis=1), axis=0)
            hit = valid & (expert == pick)  # padding lanes repeat the next group's ids
            w = tl.sum(tl.sum(tl.where(hit, score, 0.0), axis=1), axis=0)
            ids = tl.where(ki == k, pick, ids)
            wts = tl.where(ki == k, w, wts)
            choice = tl.where(hit, float("-inf"), choice)
        if RENORM:
            total = tl.zeros([K_PAD], dtype=tl.float32) + (tl.sum(wts, axis=0) + 1e-20)
            wts = tl.math.div_rn(wts, total)
        wts = wts * scaling
        out = tok * TOP_K + ki
        tl.store(w_ptr + out, wts, mask=ki < TOP_K)
        tl.store(ids_ptr + out, ids.to(ids_ptr.dtype.element_ty), mask=ki < TOP_K)
