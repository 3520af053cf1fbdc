"""Sigmoid top-k router and fused routed experts of the GLM-4.5 MoE block.

Contract:
- ``TopKRouter(x) -> RouterOutput``: logits in float32 from the (replicated) gate weight,
  ``sigmoid`` scores, ``e_score_correction_bias`` added for *selection only*, group limit
  (``n_group`` / ``topk_group``, groups ranked by the sum of their top-2 biased scores), top-k,
  then the *unbiased* scores of the chosen experts renormalised (+1e-20) and scaled: on CUDA
  the Triton kernel of ``kernels/moe_routing.py`` unless ``kernels.dispatch`` says no, else that
  module's torch reference.
- ``FusedMoE(x, router_out, out_dtype=float32) -> [T, H]`` *partial* sum (float32 sums rounded
  once to ``out_dtype``; on the fused path one combine kernel adds the k slots and rounds) of the
  routed experts held by this
  rank, and of the shared experts when it holds them (``num_shared``: each shared expert of
  width I is one more stacked slot ``E + j`` that every token visits with weight 1, so it runs
  inside the same expert kernels; only without expert parallelism, where every rank keeps its
  TP slice of every slot); the caller adds a separate shared expert otherwise and does the one
  all-reduce. The experts run through
  ``experts_grouped``, which picks one of two paths, neither reading a device value on the host
  (both CUDA-graph safe): on CUDA, unless ``kernels.dispatch`` says no, decode-sized batches
  (``T*K <= kernels.fused_moe.MAX_SLOTS``) with bf16/fp16 weights and FP8 weights at any size
  take the Triton kernels of ``kernels/fused_moe.py`` (slots aligned to expert row blocks,
  gate/up GEMM with the SiLU-mul fused, down GEMM with the routing weight fused, a sum over k);
  everything else (CPU, float32, bf16 prefill-sized batches) sorts the slots once, runs two
  grouped GEMMs and combines with one ``index_add_``. ``experts_reference`` is the per-expert
  loop both must match. Weights are stacked: ``w13_weight [E_local + S, 2*I_local, H]`` (gate
  rows then up rows) and ``w2_weight [E_local + S, H, I_local]``;
  ``weight_loader(param, loaded, shard_id "w1"|"w3"|"w2", expert_id)`` takes one checkpoint
  expert tensor (``expert_id`` E + j: shared slot j). Sharding: expert parallel keeps whole experts
  ``[rank*E/ws, (rank+1)*E/ws)``; tensor parallel keeps every expert's slice of the
  intermediate dim. In FP8 (``models/layers/fp8.py``, ``Fp8MoEMethod``) both weights hold
  ``float8_e4m3fn`` codes beside ``w13_weight_scale [E_local, 2I, 1]`` / ``w2_weight_scale
  [E_local, H, 1]`` float32; off the kernels the GEMMs are ``scaled_grouped_mm``.

What does not belong here: mapping shared-expert checkpoint names (model.py), FP8 weight creation
and loading (fp8.py), the expert kernels themselves (``kernels/``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from kernels import fused_moe, moe_routing
from kernels.dispatch import triton_enabled
from kernels.moe_grouped_gemm import grouped_mm, scaled_grouped_mm
from models.distributed import divide, get_parallel_state
from models.layers.activation import silu_and_mul
from models.layers.linear import check_shape, default_weight_loader


class RouterOutput(NamedTuple):
    weights: torch.Tensor  # [T, K] float32, renormalised unbiased scores x scaling factor
    ids: torch.Tensor  # [T, K] int64, global expert ids


class TopKRouter(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        n_group: int = 1,
        topk_group: int = 1,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.n_group, self.topk_group = n_group, topk_group
        divide(num_experts, n_group, "routed experts per group")
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        # held in float32 (the logits are float32 anyway): no cast of the whole gate every step
        self.weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, dtype=torch.float32), False
        )
        self.weight.weight_loader = default_weight_loader
        # kept in float32 whatever the model dtype: it shifts near-equal sigmoid scores
        bias = torch.zeros(num_experts, dtype=torch.float32)
        self.e_score_correction_bias = nn.Parameter(bias, requires_grad=False)
        self.e_score_correction_bias.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> RouterOutput:  # x [T, H]
        logits = x.float() @ self.weight.float().t()  # [T, E]; a no-op cast unless moved
        # to another dtype by the caller
        use_kernel = triton_enabled(logits) and moe_routing.supported(
            logits, self.n_group, self.topk_group, self.top_k
        )
        route_fn = moe_routing.route_topk if use_kernel else moe_routing.route_topk_reference
        route = route_fn(
            logits,
            self.e_score_correction_bias,
            self.top_k,
            self.n_group,
            self.topk_group,
            self.norm_topk_prob,
            self.routed_scaling_factor,
        )
        return RouterOutput(route.weights, route.ids)


class FusedMoE(nn.Module):
    """Routed experts of one layer, stacked, split by EP or TP per the parallel state."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype | None = None,
        num_shared: int = 0,  # shared experts of width ``intermediate_size`` held as extra slots
    ) -> None:
        super().__init__()
        state = get_parallel_state()
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.intermediate_size = intermediate_size
        self.rank, self.world = state.rank, state.world_size
        self.expert_parallel = state.expert_parallel
        if num_shared and self.expert_parallel and self.world > 1:
            raise ValueError("shared experts ride in the routed slots only without EP")
        self.num_shared = num_shared
        if self.expert_parallel:
            self.num_local_experts = divide(num_experts, self.world, "routed experts")
            self.local_intermediate = intermediate_size
        else:
            self.num_local_experts = num_experts
            self.local_intermediate = divide(intermediate_size, self.world, "moe width")
        self.expert_start = self.rank * self.num_local_experts if self.expert_parallel else 0
        e, i = self.num_local_experts + num_shared, self.local_intermediate
        self.w13_weight = nn.Parameter(torch.empty(e, 2 * i, hidden_size, dtype=dtype), False)
        self.w2_weight = nn.Parameter(torch.empty(e, hidden_size, i, dtype=dtype), False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        # set (with FP8 weights) by fp8.Fp8MoEMethod.create_weights
        self.w13_weight_scale: nn.Parameter | None = None  # [E_local, 2I, 1] float32
        self.w2_weight_scale: nn.Parameter | None = None  # [E_local, H, 1] float32
        self._bounds: torch.Tensor | None = None  # [E_local + S + 1] int64 0..E_local+S, lazily
        # [1, S] int64 shared slot ids E..E+S-1 and [1, S] float32 ones, lazily
        self._shared_route: RouterOutput | None = None

    def weight_loader(
        self, param: torch.Tensor, loaded: torch.Tensor, shard_id: str, expert_id: int
    ) -> None:
        """Copy one checkpoint expert matrix (gate "w1", up "w3" or down "w2") into place."""
        inter, hidden = self.intermediate_size, self.hidden_size
        expected = (hidden, inter) if shard_id == "w2" else (inter, hidden)
        check_shape(loaded, expected)
        self.place_expert(param, loaded, shard_id, expert_id, slice_down=True)

    def place_expert(
        self,
        param: torch.Tensor,  # [E_local, rows, cols]
        loaded: torch.Tensor,  # one checkpoint expert's tensor, shape already checked
        shard_id: str,
        expert_id: int,
        slice_down: bool,  # the down projection's columns are this rank's slice (weights only)
    ) -> None:
        """Copy into this rank's slot: gate/up rows sliced by TP, stacked gate then up."""
        slots = self.num_experts + self.num_shared
        if not 0 <= expert_id < slots:
            raise ValueError(f"expert {expert_id} outside 0..{slots - 1}")
        local = expert_id - self.expert_start
        if not 0 <= local < self.num_local_experts + self.num_shared:
            return  # another rank owns this expert
        i = self.local_intermediate
        start = 0 if self.expert_parallel else self.rank * i
        if shard_id == "w2":
            param.data[local].copy_(loaded.narrow(1, start, i) if slice_down else loaded)
        elif shard_id in ("w1", "w3"):
            offset = 0 if shard_id == "w1" else i
            param.data[local].narrow(0, offset, i).copy_(loaded.narrow(0, start, i))
        else:
            raise ValueError(f"unknown expert shard {shard_id!r}")

    def forward(
        self, x: torch.Tensor, route: RouterOutput, out_dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """x [T, H] -> [T, H] partial sum over the experts/slices this rank holds, accumulated
        in float32 and rounded once to ``out_dtype``."""
        # under EP some slots belong to other ranks; with all experts local none can
        foreign = self.expert_parallel and self.world > 1
        if self._bounds is None or self._bounds.device != x.device:
            self._bounds = _expert_bounds(self.num_local_experts + self.num_shared, x.device)
        if self.num_shared:
            route = self._with_shared(route)
        return experts_grouped(
            x,
            self.w13_weight,
            self.w2_weight,
            route,
            self.expert_start,
            foreign_slots=foreign,
            bounds=self._bounds,
            w13_scale=self.w13_weight_scale,
            w2_scale=self.w2_weight_scale,
            out_dtype=out_dtype,
        )

    def _with_shared(self, route: RouterOutput) -> RouterOutput:
        """Every token also visits the shared slots, weight 1 (not scaled by the router)."""
        t, device = route.ids.shape[0], route.ids.device
        shared = self._shared_route
        if shared is None or shared.ids.device != device:
            ids = torch.arange(self.num_shared, device=device) + self.num_experts
            weights = torch.ones(1, self.num_shared, dtype=torch.float32, device=device)
            shared = self._shared_route = RouterOutput(weights, ids[None])
        return RouterOutput(
            torch.cat((route.weights, shared.weights.expand(t, -1)), 1),
            torch.cat((route.ids, shared.ids.expand(t, -1)), 1),
        )


def _expert_bounds(e_local: int, device: torch.device) -> torch.Tensor:  # [E_local + 1] int64
    # searchsorted of these in the sorted expert keys gives each expert's start row ([1:]: end)
    return torch.arange(0, e_local + 1, device=device, dtype=torch.int64)


def experts_grouped(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E_local, 2I, H]
    w2: torch.Tensor,  # [E_local, H, I]
    route: RouterOutput,
    expert_start: int = 0,
    foreign_slots: bool = True,  # False only when every routed id is a local expert
    use_fused: bool | None = None,  # passed to grouped_mm; None = its own choice
    bounds: torch.Tensor | None = None,  # [E_local + 1] int64 0..E_local, reused across calls
    w13_scale: torch.Tensor | None = None,  # [E_local, 2I, 1] float32 when w13 is FP8
    w2_scale: torch.Tensor | None = None,  # [E_local, H, 1] float32 when w2 is FP8
    use_triton: bool | None = None,  # None = decode-sized CUDA bf16/fp16; False = grouped
    out_dtype: torch.dtype = torch.float32,  # the float32 sums rounded once to this dtype
) -> torch.Tensor:  # [T, H] out_dtype
    """Decode-sized batches: the fused Triton kernels. Otherwise sort the (token, k) slots by
    expert once, run both expert GEMMs as grouped GEMMs over contiguous row blocks, then weight
    and scatter-add back with one ``index_add_``.

    Slots routed to another rank's experts get the key ``E_local``, so they sort after every
    local group and fall past the last offset; their rows are zeroed before the combine. No step
    reads a device value on the host, so both paths stay free of stream synchronisation.
    """
    t, k = route.ids.shape
    e_local = w13.shape[0]
    if t == 0:
        return torch.zeros(0, x.shape[-1], dtype=out_dtype, device=x.device)
    if bounds is None:
        bounds = _expert_bounds(e_local, x.device)
    if use_triton is None:
        use_triton = _triton_path(x, w13, w2, t * k, w13_scale)
    if use_triton:
        return fused_moe.fused_experts(
            x, w13, w2, route.weights, route.ids, expert_start, foreign_slots, edges=bounds,
            w13_scale=w13_scale, w2_scale=w2_scale, out_dtype=out_dtype,
        )  # fmt: skip
    out = torch.zeros(t, x.shape[-1], dtype=torch.float32, device=x.device)
    local = route.ids.reshape(-1) - expert_start  # [T*K]
    if foreign_slots:
        local = torch.where((local >= 0) & (local < e_local), local, e_local)
    # stable, so the combine adds slots in the same order as the per-expert reference
    keys, order = local.sort(stable=True)  # [T*K], [T*K]
    offs = torch.searchsorted(keys, bounds[1:], out_int32=True)  # [E_local] end row of experts
    tokens = order // k  # [T*K] source token of each sorted slot
    h = silu_and_mul(_expert_mm(x.index_select(0, tokens), w13, w13_scale, offs, use_fused))
    y = _expert_mm(h, w2, w2_scale, offs, use_fused).float()  # [T*K, H]
    y = y * route.weights.reshape(-1).index_select(0, order)[:, None]
    if foreign_slots:
        # rows past offs[-1] are unspecified (may hold NaN), so select rather than scale
        y = torch.where((keys < e_local)[:, None], y, 0.0)
    out.index_add_(0, tokens, y)
    return out.to(out_dtype)


def _triton_path(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E_local, 2I, H]
    w2: torch.Tensor,  # [E_local, H, I]
    num_slots: int,  # T*K
    w13_scale: torch.Tensor | None,
) -> bool:
    # float32 stays on exact GEMMs (the kernels would run fp32 without tensor cores); bf16
    # prefill-sized batches are past MAX_SLOTS, where grouped_mm's large tiles win; FP8 weights
    # take the kernels at every size (they read the codes; the scaled grouped GEMM needs
    # quantised activations and a torch build that has it)
    return (
        x.dtype in (torch.bfloat16, torch.float16)
        and triton_enabled(x)
        and fused_moe.supported(x, w13, w2, num_slots, fp8=w13_scale is not None)
    )


def _expert_mm(
    x: torch.Tensor,  # [M, K]
    w: torch.Tensor,  # [E_local, N, K] x.dtype, or float8_e4m3fn codes with ``scale``
    scale: torch.Tensor | None,  # [E_local, N, 1] float32 or None
    offs: torch.Tensor,  # [E_local] int32
    use_fused: bool | None,
) -> torch.Tensor:  # [M, N] x.dtype
    if scale is None:
        return grouped_mm(x, w, offs, use_fused)
    return scaled_grouped_mm(x, w, scale, offs, use_fused)


def experts_reference(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E_local, 2I, H]
    w2: torch.Tensor,  # [E_local, H, I]
    route: RouterOutput,
    expert_start: int = 0,
) -> torch.Tensor:  # [T, H] float32
    """Loop over the experts that received tokens; each gathers its tokens and runs one dense
    GEMM. Kept as the reference ``experts_grouped`` is tested and benchmarked against."""
    t, k = route.ids.shape
    out = torch.zeros(t, x.shape[-1], dtype=torch.float32, device=x.device)
    local_ids = route.ids.reshape(-1) - expert_start  # [T*K]
    owned = (local_ids >= 0) & (local_ids < w13.shape[0])
    slots = owned.nonzero().squeeze(1)  # flat (token, k) slots routed to this rank
    if slots.numel() == 0:
        return out
    slot_experts = local_ids.index_select(0, slots)
    slot_experts, order = slot_experts.sort(stable=True)
    slots = slots.index_select(0, order)
    counts = torch.bincount(slot_experts, minlength=w13.shape[0]).tolist()
    flat_weights = route.weights.reshape(-1)
    begin = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        chunk = slots[begin : begin + n]
        begin += n
        tokens = chunk // k
        h = silu_and_mul(x.index_select(0, tokens) @ w13[expert].t())
        y = (h @ w2[expert].t()).float() * flat_weights.index_select(0, chunk)[:, None]
        out.index_add_(0, tokens, y)
    return out
