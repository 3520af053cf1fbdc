"""Kernel micro-benchmark: the decoder's small Triton kernels against their torch references.

``python -m bench.kernels_bench [--tokens 1,32,256,4096] [--contexts 540,8192] [--iters 200]
[--graph] [--json PATH]`` (CUDA only) times, at GLM-4.5V sizes and bf16 activations, for each
token count (decode: 1, 32, 256; prefill: 4096):

- ``rmsnorm`` / ``add_rmsnorm``: hidden 4096 (``kernels/rmsnorm.py``);
- ``rotary``: 96 q + 8 kv heads of 128 inside a fused qkv row, rotary dim 64, M-RoPE cos/sin
  (``kernels/rotary.py``, in place);
- ``moe_routing``: 128 experts, top-8, one group, float32 logits (``kernels/moe_routing.py``);
- ``fp8_token`` / ``fp8_block128``: dynamic e4m3 quantisation of ``[T, 4096]``
  (``kernels/quant_fp8.py``);
- ``paged@C``: decode attention of T sequences of C context tokens each (``--contexts``), 96 q /
  8 kv heads of 128 over a paged cache of 16-token blocks in shuffled order: the attention
  layer's gather + SDPA decode against ``kernels/paged_attention.py`` with the split count an
  engine of longest context C fixes; skipped where T x C passes ``PAGED_MAX_TOKENS``.

``--w8a16-sweep`` instead times the W8A16 decode GEMM (``kernels/fp8_gemv.py``) at the FP8
projection shapes of GLM-4.5-Air (qkv, attention output, dense MLP gate|up and down) for every
tile and K-split choice in ``W8A16_SPACE`` at ``--tokens`` rows (CUDA-graph replays), and prints
each shape's best choice next to the one ``_tiles`` picks, in GB/s of codes read.

Each row prints microseconds per call of the torch reference and of the kernel, the speed-up,
both achieved GB/s (bytes each op must move at least: inputs read once, outputs written once;
for ``paged`` the K and V of every context)
and how far the outputs are apart. Eager timing includes the launch cost of every torch op,
which is what decode pays without CUDA graphs; ``--graph`` captures ``iters`` calls in one CUDA
graph and times its replay (device time only; capture itself checks graph safety). Not a test:
nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from kernels import fp8_gemv, moe_routing, paged_attention, quant_fp8, rmsnorm, rotary
from models.layers.attention import Attention, AttentionMetadata
from models.layers.rotary import MRotaryEmbedding

HIDDEN, HQ, HK, HEAD_DIM, ROTARY_DIM = 4096, 96, 8, 128, 64
EXPERTS, TOP_K = 128, 8
BLOCK = 16  # KV cache tokens per block
PAGED_MAX_TOKENS = 1 << 19  # sequences x context of the largest paged row: 2 GiB of bf16 KV
BF16 = torch.bfloat16
DEVICE = "cuda"


@dataclass(frozen=True)
class Case:
    name: str
    reference: Callable[[], object]
    kernel: Callable[[], object]
    bytes_moved: int
    diff: Callable[[], str]  # how far the two outputs are apart, for the row


@dataclass(frozen=True)
class Row:
    kernel: str
    tokens: int
    torch_us: float
    triton_us: float
    speedup: float
    torch_gbps: float
    triton_gbps: float
    diff: str


def time_us(fn: Callable[[], object], iters: int, graph: bool) -> float:
    """Microseconds per call, eager or replayed from one CUDA graph of ``iters`` calls."""
    for _ in range(3):  # compile / warm the caching allocator outside any capture
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                fn()
        g.replay()
        torch.cuda.synchronize()
        start.record()
        g.replay()
        end.record()
    else:
        start.record()
        for _ in range(iters):
            fn()
        end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / iters


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"max|d|={(a.float() - b.float()).abs().max().item():.2e}"


def norm_cases(t: int, gen: torch.Generator) -> list[Case]:
    x = torch.randn(t, HIDDEN, generator=gen).to(DEVICE, BF16)
    res = torch.randn(t, HIDDEN, generator=gen).to(DEVICE, BF16)
    w = (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).to(DEVICE, BF16)
    row = t * HIDDEN * 2
    return [
        Case(
            "rmsnorm",
            lambda: rmsnorm.rms_norm_reference(x, w, 1e-5),
            lambda: rmsnorm.rms_norm(x, w, 1e-5),
            2 * row + HIDDEN * 2,
            lambda: _max_diff(rmsnorm.rms_norm(x, w, 1e-5), rmsnorm.rms_norm_reference(x, w, 1e-5)),
        ),
        Case(
            "add_rmsnorm",
            lambda: rmsnorm.add_rms_norm_reference(x, res, w, 1e-5),
            lambda: rmsnorm.add_rms_norm(x, res, w, 1e-5),
            4 * row + HIDDEN * 2,
            lambda: _max_diff(
                rmsnorm.add_rms_norm(x, res, w, 1e-5).out,
                rmsnorm.add_rms_norm_reference(x, res, w, 1e-5).out,
            ),
        ),
    ]


def rotary_case(t: int, gen: torch.Generator) -> Case:
    qkv = torch.randn(t, HQ + 2 * HK, HEAD_DIM, generator=gen).to(DEVICE, BF16)
    layer = MRotaryEmbedding(HEAD_DIM, ROTARY_DIM, 10000.0, (8, 12, 12)).to(DEVICE)
    rope = layer(torch.randint(0, 8192, (3, t), generator=gen).to(DEVICE), BF16)
    qk = qkv[:, : HQ + HK]  # rotated in place every call: the rotation keeps magnitudes

    def diff() -> str:
        a, b = qkv.clone(), qkv.clone()
        rotary.rotary_(a[:, : HQ + HK], rope.cos, rope.sin, ROTARY_DIM)
        rotary.rotary_reference_(b[:, : HQ + HK], rope.cos, rope.sin, ROTARY_DIM)
        return "bit-equal" if torch.equal(a, b) else _max_diff(a, b)

    moved = 2 * t * (HQ + HK) * ROTARY_DIM * 2 + 2 * t * (ROTARY_DIM // 2) * 2
    return Case(
        "rotary",
        lambda: rotary.rotary_reference_(qk, rope.cos, rope.sin, ROTARY_DIM),
        lambda: rotary.rotary_(qk, rope.cos, rope.sin, ROTARY_DIM),
        moved,
        diff,
    )


def routing_case(t: int, gen: torch.Generator) -> Case:
    logits = (torch.randn(t, EXPERTS, generator=gen) * 2).to(DEVICE)
    bias = (torch.randn(EXPERTS, generator=gen) * 0.3).to(DEVICE)

    def diff() -> str:
        got = moe_routing.route_topk(logits, bias, TOP_K)
        want = moe_routing.route_topk_reference(logits, bias, TOP_K)
        same = (got.ids.sort(1).values == want.ids.sort(1).values).all(1)
        w_got = got.weights.gather(1, got.ids.sort(1).indices)[same]
        w_want = want.weights.gather(1, want.ids.sort(1).indices)[same]
        return f"same experts {same.float().mean().item():.4f}; " + _max_diff(w_got, w_want)

    moved = t * EXPERTS * 4 + EXPERTS * 4 + t * TOP_K * (4 + 8)
    return Case(
        "moe_routing",
        lambda: moe_routing.route_topk_reference(logits, bias, TOP_K),
        lambda: moe_routing.route_topk(logits, bias, TOP_K),
        moved,
        diff,
    )


def fp8_cases(t: int, gen: torch.Generator) -> list[Case]:
    x = (torch.randn(t, HIDDEN, generator=gen) * 4).to(DEVICE, BF16)

    def diff(kernel_fn, ref_fn) -> Callable[[], str]:
        def run() -> str:
            got, want = kernel_fn(x), ref_fn(x)
            codes = (got.q.view(torch.uint8) != want.q.view(torch.uint8)).float().mean().item()
            return f"codes differ {codes:.1e}; scale " + _max_diff(got.scale, want.scale)

        return run

    token, block = quant_fp8.quant_fp8_per_token, quant_fp8.quant_fp8_per_block
    token_ref = quant_fp8.quant_fp8_per_token_reference
    block_ref = quant_fp8.quant_fp8_per_block_reference
    io = t * HIDDEN * (2 + 1)
    return [
        Case(
            "fp8_token", lambda: token_ref(x), lambda: token(x), io + t * 4, diff(token, token_ref)
        ),
        Case(
            "fp8_block128",
            lambda: block_ref(x),
            lambda: block(x),
            io + t * (HIDDEN // 128) * 4,
            diff(block, block_ref),
        ),
    ]


def paged_case(batch: int, context: int, gen: torch.Generator) -> Case:
    per_seq = -(-context // BLOCK)
    shape = (2, batch * per_seq, BLOCK, HK, HEAD_DIM)
    cache = torch.randn(shape, device=DEVICE, dtype=BF16)  # on the device: up to 2 GiB
    tables = torch.randperm(batch * per_seq, generator=gen).view(batch, per_seq).int().to(DEVICE)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, HQ, HEAD_DIM, generator=gen).to(DEVICE, BF16)
    layer = Attention(HQ, HK, HEAD_DIM, scale=HEAD_DIM**-0.5)
    layer.kv_cache = cache
    meta = AttentionMetadata(
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32, device=DEVICE),
        seq_lens_k=lens,
        max_seqlen_q=1,
        max_seqlen_k=context,
        block_tables=tables,
    )
    splits = paged_attention.splits_for_context(context)

    def kernel() -> torch.Tensor:
        return paged_attention.paged_decode_attention(
            q, cache[0], cache[1], tables, lens, context, layer.scale, num_splits=splits
        )

    # the first reference call builds the gather plan on meta; replays reuse it (capturable)
    return Case(
        f"paged@{context}",
        lambda: layer._sdpa_decode(q, meta),
        kernel,
        2 * batch * context * HK * HEAD_DIM * 2,
        lambda: _max_diff(kernel(), layer._sdpa_decode(q, meta)),
    )


# (N, K) of the FP8 projections a decode step runs per layer (the MoE layers' shared expert now
# runs inside the fused expert kernels)
W8A16_SHAPES = {
    "qkv": (HQ * HEAD_DIM + 2 * HK * HEAD_DIM, HIDDEN),
    "o_proj": (HIDDEN, HQ * HEAD_DIM),
    "mlp_gate_up": (2 * 10944, HIDDEN),
    "mlp_down": (HIDDEN, 10944),
}
# (block_n, block_k, warps, stages, split_k)
W8A16_SPACE = [
    (bn, bk, 4, st, sp)
    for bn in (32, 64)
    for bk in (256, 512)
    for st in (3, 5)
    for sp in (1, 2, 4, 8)
]


def _time_w8a16(x, q, scale, tiles, iters: int) -> float:
    return time_us(lambda: fp8_gemv.w8a16_linear(x, q, scale, tiles=tiles), iters, graph=True)


def w8a16_sweep(tokens: list[int], iters: int) -> list[dict]:
    from models.layers.fp8 import quantize_per_channel

    results = []
    print(f"{'shape':<13}{'M':>4}{'N':>7}{'K':>7}  {'choice':<24}{'us':>8}{'GB/s':>8}")
    for name, (n, k) in W8A16_SHAPES.items():
        gen = torch.Generator().manual_seed(n + k)
        q, scale = quantize_per_channel((torch.randn(n, k, generator=gen) / k**0.5).to(DEVICE))
        for m in tokens:
            x = torch.randn(m, k, generator=gen).to(DEVICE, BF16)
            timed = {tiles: _time_w8a16(x, q, scale, tiles, iters) for tiles in W8A16_SPACE}
            best = min(timed, key=timed.get)
            table = fp8_gemv._tiles(m, n, k)
            picked = timed[table] if table in timed else _time_w8a16(x, q, scale, table, iters)
            for label, tiles, us in (("best", best, timed[best]), ("_tiles", table, picked)):
                gbps = n * k / us / 1e3  # the codes, one byte each
                print(
                    f"{name:<13}{m:>4}{n:>7}{k:>7}  {label:<7}{tiles!s:<17}{us:>8.1f}{gbps:>8.0f}"
                )
            results.append(
                {"shape": name, "m": m, "n": n, "k": k, "best": best, "best_us": timed[best],
                 "tiles": table, "tiles_us": picked}
            )  # fmt: skip
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1,32,256,4096", help="comma-separated token counts")
    p.add_argument("--contexts", default="540,8192", help="comma-separated paged contexts")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--graph", action="store_true", help="time CUDA-graph replays")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--w8a16-sweep", action="store_true", help="sweep the W8A16 GEMM's tiles")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("kernels_bench needs a CUDA device")
        return 1
    if args.w8a16_sweep:
        rows = w8a16_sweep([int(v) for v in args.tokens.split(",")], args.iters)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    fp8 = torch.cuda.get_device_capability() >= (8, 9)
    print(f"{torch.cuda.get_device_name()}  mode={'graph' if args.graph else 'eager'}")
    header = f"{'kernel':<13}{'T':>6}{'torch us':>10}{'triton us':>11}{'x':>7}"
    print(header + f"{'torch GB/s':>12}{'triton GB/s':>13}  diff")
    rows = []
    for t in (int(v) for v in args.tokens.split(",")):
        gen = torch.Generator().manual_seed(t)
        cases = [*norm_cases(t, gen), rotary_case(t, gen), routing_case(t, gen)]
        if fp8:
            cases += fp8_cases(t, gen)
        contexts = (int(v) for v in args.contexts.split(","))
        cases += [paged_case(t, c, gen) for c in contexts if t * c <= PAGED_MAX_TOKENS]
        for case in cases:
            ref_us = time_us(case.reference, args.iters, args.graph)
            ker_us = time_us(case.kernel, args.iters, args.graph)
            row = Row(
                case.name,
                t,
                ref_us,
                ker_us,
                ref_us / ker_us,
                case.bytes_moved / ref_us / 1e3,
                case.bytes_moved / ker_us / 1e3,
                case.diff(),
            )
            rows.append(row)
            print(
                f"{row.kernel:<13}{t:>6}{ref_us:>10.1f}{ker_us:>11.1f}{row.speedup:>7.2f}"
                f"{row.torch_gbps:>12.1f}{row.triton_gbps:>13.1f}  {row.diff}"
            )
    if not fp8:
        print("fp8 kernels skipped: the device has no e4m3 conversion (needs sm_89+)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
