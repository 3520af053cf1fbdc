"""Layer micro-benchmark: routed MoE experts and paged decode attention, old path vs new path.

``python -m bench.layers_bench [--device cpu|cuda] [--batch-sizes 1,32] [--width-div 4] [--threads 1]``
builds one MoE layer and one attention layer with GLM-4.5V text widths divided by
``--width-div`` (head_dim and the 12:1 GQA ratio kept; ``--experts`` may shrink the expert count
for small machines), random weights and a paged KV cache filled with random values, then times:

- MoE: ``experts_reference`` (one gather + GEMM pair per active expert, the previous layer body)
  vs ``experts_grouped`` (one sort, two grouped GEMMs, one ``index_add_``);
- decode attention (one new token per sequence, contexts drawn up to ``--context``): the previous
  per-sequence SDPA loop (kept below as ``old_sdpa``) vs ``Attention._sdpa``'s batched decode,
  and on CUDA also vs ``kernels.paged_attention`` (Triton split-K).

Each row prints both times, the speed-up, the new path's achieved GB/s (expert weights touched,
or KV bytes read) and the largest difference between the two outputs. Not a test: nothing is
asserted; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from models.glm4v.config import TextConfig
from models.layers.attention import Attention, AttentionMetadata
from models.layers.moe import TopKRouter, experts_grouped, experts_reference

BLOCK_SIZE = 16


def timed(fn: Callable[[], torch.Tensor], iters: int, device: torch.device) -> float:
    """Mean seconds per call after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def old_sdpa(layer: Attention, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
    """The per-sequence loop the attention layer ran before (mask and KV expansion per sequence)."""
    cu, lens_k = meta.cu_seqlens_q_cpu, meta.seq_lens_k_cpu
    out = torch.empty_like(q)
    groups = layer.num_heads // layer.num_kv_heads
    for i in range(len(cu) - 1):
        s, e = cu[i], cu[i + 1]
        n_q, n_k = e - s, lens_k[i]
        cache, block_size = layer.kv_cache, layer.kv_cache.shape[2]
        blocks = meta.block_tables[i][: (n_k + block_size - 1) // block_size].long()
        ks = cache[0, blocks].reshape(-1, layer.num_kv_heads, layer.head_dim)[:n_k]
        vs = cache[1, blocks].reshape(-1, layer.num_kv_heads, layer.head_dim)[:n_k]
        qh = q[s:e].transpose(0, 1)
        kh = ks.transpose(0, 1).repeat_interleave(groups, dim=0).to(q.dtype)
        vh = vs.transpose(0, 1).repeat_interleave(groups, dim=0).to(q.dtype)
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        o = F.scaled_dot_product_attention(
            qh[None], kh[None], vh[None], attn_mask=mask, scale=layer.scale
        )
        out[s:e] = o[0].transpose(0, 1)
    return out


def bench_moe(cfg: TextConfig, batch: int, a, dev, dtype) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(batch)
    h, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    router = TopKRouter(h, e, cfg.num_experts_per_tok, n_group=1, topk_group=1)
    router.weight.data = torch.randn(e, h, generator=gen).to(dev, dtype)
    router.to(dev)
    w13 = (torch.randn(e, 2 * i, h, generator=gen) / h**0.5).to(dev, dtype)
    w2 = (torch.randn(e, h, i, generator=gen) / i**0.5).to(dev, dtype)
    x = torch.randn(batch, h, generator=gen).to(dev, dtype)
    route = router(x)
    old = experts_reference(x, w13, w2, route)
    new = experts_grouped(x, w13, w2, route, foreign_slots=False)
    t_old = timed(lambda: experts_reference(x, w13, w2, route), a.iters, dev)
    t_new = timed(lambda: experts_grouped(x, w13, w2, route, foreign_slots=False), a.iters, dev)
    touched = int(route.ids.unique().numel())
    weight_bytes = touched * (w13[0].numel() + w2[0].numel()) * w13.element_size()
    return row("moe experts", batch, t_old, t_new, weight_bytes, old, new)


def bench_decode(cfg: TextConfig, batch: int, a, dev, dtype) -> list[dict]:
    gen = torch.Generator(device="cpu").manual_seed(batch)
    hq, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    layer = Attention(hq, hk, d, scale=d**-0.5)
    lens = torch.randint(a.context // 2, a.context + 1, (batch,), generator=gen).tolist()
    per_seq = (a.context + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks = batch * per_seq
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, hk, d, generator=gen)
    layer.kv_cache = cache.to(dev, dtype)
    tables = torch.randperm(num_blocks, generator=gen).view(batch, per_seq).int()
    meta = AttentionMetadata(
        cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32, device=dev),
        seq_lens_k=torch.tensor(lens, dtype=torch.int32, device=dev),
        max_seqlen_q=1,
        max_seqlen_k=max(lens),
        block_tables=tables.to(dev),
        seq_lens_k_cpu=lens,
        cu_seqlens_q_cpu=list(range(batch + 1)),
    )
    q = torch.randn(batch, hq, d, generator=gen).to(dev, dtype)
    kv = torch.randn(2, batch, hk, d, generator=gen).to(dev, dtype)  # unused by the decode read
    old = old_sdpa(layer, q, kv[0], kv[1], meta)
    new = layer._sdpa(q, kv[0], kv[1], meta)
    t_old = timed(lambda: old_sdpa(layer, q, kv[0], kv[1], meta), a.iters, dev)
    t_new = timed(lambda: layer._sdpa(q, kv[0], kv[1], meta), a.iters, dev)
    kv_bytes = 2 * sum(lens) * hk * d * layer.kv_cache.element_size()
    rows = [row(f"decode attn ctx<={a.context}", batch, t_old, t_new, kv_bytes, old, new)]
    if dev.type == "cuda":  # the Triton split-K kernel, not yet the layer's default
        from kernels.paged_attention import paged_decode_attention

        cache = layer.kv_cache

        def triton_decode() -> torch.Tensor:
            return paged_decode_attention(
                q, cache[0], cache[1], meta.block_tables, meta.seq_lens_k, max(lens), d**-0.5
            )

        t_tri = timed(triton_decode, a.iters, dev)
        rows.append(row("decode attn triton", batch, t_old, t_tri, kv_bytes, old, triton_decode()))
    return rows


def row(name: str, batch: int, t_old: float, t_new: float, nbytes: int, old, new) -> dict:
    return {
        "layer": name,
        "batch": batch,
        "old_ms": t_old * 1e3,
        "new_ms": t_new * 1e3,
        "speedup": t_old / t_new,
        "new_GBps": nbytes / t_new / 1e9,
        "max_abs_diff": float((old.float() - new.float()).abs().max()),
    }


def scaled_config(a) -> TextConfig:
    base = TextConfig()
    div = a.width_div
    return TextConfig(
        hidden_size=base.hidden_size // div,
        moe_intermediate_size=base.moe_intermediate_size // div,
        num_attention_heads=base.num_attention_heads // div,
        num_key_value_heads=max(1, base.num_key_value_heads // div),
        head_dim=base.head_dim,
        n_routed_experts=a.experts or base.n_routed_experts,
        num_experts_per_tok=base.num_experts_per_tok,
    )


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--width-div", type=int, default=1 if cuda else 4)
    p.add_argument("--experts", type=int, default=0, help="0 = the model's 128")
    p.add_argument("--context", type=int, default=2048 if cuda else 512)
    p.add_argument("--iters", type=int, default=20 if cuda else 5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = torch's default")
    p.add_argument("--json", default="")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dtype = getattr(torch, a.dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    cfg = scaled_config(a)
    print(
        f"device={dev} dtype={dtype} hidden={cfg.hidden_size} moe_inter="
        f"{cfg.moe_intermediate_size} experts={cfg.n_routed_experts} top_k="
        f"{cfg.num_experts_per_tok} heads={cfg.num_attention_heads}/{cfg.num_key_value_heads}"
        f"x{cfg.head_dim} block={BLOCK_SIZE} threads={torch.get_num_threads()}"
    )
    rows = []
    for batch in (int(b) for b in a.batch_sizes.split(",")):
        rows.append(bench_moe(cfg, batch, a, dev, dtype))
        rows.extend(bench_decode(cfg, batch, a, dev, dtype))
    print(f"{'layer':<24}{'batch':>6}{'old ms':>10}{'new ms':>10}{'x':>7}{'GB/s':>8}{'diff':>10}")
    for r in rows:
        print(
            f"{r['layer']:<24}{r['batch']:>6}{r['old_ms']:>10.2f}{r['new_ms']:>10.2f}"
            f"{r['speedup']:>7.1f}{r['new_GBps']:>8.1f}{r['max_abs_diff']:>10.1e}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": str(dev), "dtype": str(dtype), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
