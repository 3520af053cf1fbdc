"""Causal attention over a flat (varlen) batch with an optional paged KV cache.

Contract: ``Attention.forward(q, k, v, meta)`` takes the projected, rotated q/k/v of the T new
tokens of B sequences packed back to back (no padding) and returns the attention output.
When ``meta.block_tables`` is None the batch is a pure prefill with no cache: every sequence
attends causally over its own new tokens only (used by parity tests and the encoder-free path).
Otherwise the new k/v are first written to the paged cache at ``meta.slot_mapping`` (unless the
caller passes ``cache_written=True``) and each sequence attends over its whole context read from
its block table. ``rotate_and_cache_(qkv, num_q_heads, cos, sin, rotary_dim, meta)`` is the
decoder's fused prologue on CUDA: one kernel (``kernels/rotary.py``'s ``rotary_cache_``) rotates
q and k in place inside the fused ``qkv [T, Hq + 2Hk, D]`` rows and writes k and v to the cache;
it returns False, doing nothing, where that kernel does not apply (the caller then rotates and
lets ``forward`` write the cache).

Backends: on CUDA a pure decode batch (one new token per sequence) runs the Triton split-K
paged kernel (``kernels/paged_attention.py``) unless ``meta.decode_kernel`` is off; it reads the
block tables and context lengths on the device only, and with ``meta.decode_splits`` set its
launch is the same for every step, so it can be captured in a CUDA graph (as can the cache
write). Otherwise torch SDPA (CPU and fallback) lives here; flash-attn is used when installed and
the tensors are on CUDA. The SDPA path has two shapes: a pure decode batch gathers all
sequences' paged KV at once (one index op per K and V) and runs one batched SDPA; prefill
sequences run one SDPA each (``is_causal`` when the whole context is new). In a mixed batch the
sequences with one new token (the running decodes) are served together by the decode path on
CUDA (the Triton kernel, or the batched SDPA gather) and only the others run one by one.
What does not belong here: scheduling, block allocation, RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kernels import rotary as rotary_kernel
from kernels.dispatch import triton_enabled
from kernels.paged_attention import paged_decode_attention, triton

try:  # optional GPU dependency
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache  # type: ignore
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None
    flash_attn_with_kvcache = None


@dataclass
class AttentionMetadata:
    """Describes one flat batch; built by the model runner once per step, shared by all layers."""

    cu_seqlens_q: torch.Tensor  # [B+1] int32, offsets of each sequence's new tokens in the batch
    seq_lens_k: torch.Tensor  # [B] int32, full context length per sequence (cached + new)
    max_seqlen_q: int  # longest run of new tokens in the batch
    max_seqlen_k: int  # longest context in the batch
    # [T] int64, cache slot per new token; every entry must be a valid slot (padding tokens
    # name a scratch slot no block table uses, see ``Attention._write_cache``)
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32; None = no KV cache
    seq_lens_k_cpu: list[int] | None = None  # same as seq_lens_k, host copy for the torch path
    cu_seqlens_q_cpu: list[int] | None = None  # same as cu_seqlens_q, host copy
    decode_kernel: bool = True  # CUDA pure decode: the Triton paged kernel (False = SDPA)
    # that kernel's split count, fixed per engine (from the longest context it serves) so every
    # step, captured or eager, launches it alike; None = from max_seqlen_k (not capturable)
    decode_splits: int | None = None
    # built by the first layer that needs it, reused by the others (see ``decode_plan``)
    _decode_plan: DecodePlan | None = field(default=None, init=False, repr=False, compare=False)
    # mixed batches: the one-token sequences as a decode batch of their own (``decode_rows``)
    _decode_rows: DecodeRows | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def prefill(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> AttentionMetadata:
        """Metadata for a cache-free prefill of whole sequences of the given lengths."""
        cu = [0]
        for n in seq_lens:
            cu.append(cu[-1] + n)
        return cls(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            seq_lens_k=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            max_seqlen_q=max(seq_lens),
            max_seqlen_k=max(seq_lens),
            seq_lens_k_cpu=list(seq_lens),
            cu_seqlens_q_cpu=cu,
        )


class DecodePlan(NamedTuple):
    """What a pure decode step's SDPA gather needs; the same for every layer of the step."""

    block_size: int
    blocks: torch.Tensor  # [B * n_blocks] int64, each sequence's first n_blocks table entries
    keep: torch.Tensor  # [B, 1, 1, n_blocks * block_size] bool, True = a key in the context


class DecodeRows(NamedTuple):
    """The sequences of a mixed batch that bring one new token, as a pure decode batch."""

    seqs: list[int]  # their indices in the batch
    rows: torch.Tensor | slice  # their token rows in the flat batch (a slice when contiguous)
    meta: AttentionMetadata  # a pure decode batch of just those sequences


def decode_rows(meta: AttentionMetadata) -> DecodeRows | None:
    """The batch's one-token sequences as their own decode batch, built once per metadata
    object; None for fewer than two (one alone gains nothing from batching)."""
    cached = meta._decode_rows
    if cached is not None:
        return cached if len(cached.seqs) >= 2 else None
    cu = meta.cu_seqlens_q_cpu or meta.cu_seqlens_q.tolist()
    lens_k = meta.seq_lens_k_cpu or meta.seq_lens_k.tolist()
    seqs = [i for i in range(len(cu) - 1) if cu[i + 1] - cu[i] == 1]
    device = meta.seq_lens_k.device
    n = len(seqs)
    if n and seqs[-1] == n - 1:  # the scheduler puts running decodes first: views, no copies
        rows: torch.Tensor | slice = slice(0, n)
        tables, lens = meta.block_tables[:n], meta.seq_lens_k[:n]
    else:
        index = torch.tensor(seqs, dtype=torch.long, device=device)
        rows = torch.tensor([cu[i] for i in seqs], dtype=torch.long, device=device)
        tables = meta.block_tables.index_select(0, index)
        lens = meta.seq_lens_k.index_select(0, index)
    sub_lens = [lens_k[i] for i in seqs]
    sub = AttentionMetadata(
        cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32, device=device),
        seq_lens_k=lens,
        max_seqlen_q=1,
        max_seqlen_k=max(sub_lens, default=1),
        block_tables=tables,
        seq_lens_k_cpu=sub_lens,
        cu_seqlens_q_cpu=list(range(n + 1)),
        decode_kernel=meta.decode_kernel,
        decode_splits=meta.decode_splits,
    )
    meta._decode_rows = DecodeRows(seqs, rows, sub)
    return meta._decode_rows if n >= 2 else None


def decode_plan(meta: AttentionMetadata, block_size: int, device: torch.device) -> DecodePlan:
    """The step's decode gather indices and key-padding mask, built once per metadata object
    (all layers share one ``AttentionMetadata`` per step and one block size)."""
    plan = meta._decode_plan
    if plan is not None and plan.block_size == block_size:
        return plan
    n_blocks = (meta.max_seqlen_k + block_size - 1) // block_size
    # padding ids in the table are valid block numbers; what they point at is masked out
    blocks = meta.block_tables[:, :n_blocks].reshape(-1).long()
    pos = torch.arange(n_blocks * block_size, device=device)
    keep = pos[None, :] < meta.seq_lens_k.to(device)[:, None]  # [B, L]
    plan = DecodePlan(block_size, blocks, keep[:, None, None, :])
    meta._decode_plan = plan
    return plan


class Attention(torch.nn.Module):
    """Per-layer attention; ``kv_cache`` is bound by the model runner after allocation."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # [2, num_blocks, block_size, num_kv_heads, head_dim]; empty until the runner binds it
        self.kv_cache: torch.Tensor = torch.empty(0)

    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        cache_written: bool = False,  # True: ``rotate_and_cache_`` already wrote k and v
    ) -> torch.Tensor:  # [T, num_heads * head_dim]
        if meta.block_tables is not None:
            if not cache_written:
                self._write_cache(k, v, meta.slot_mapping)
            if is_pure_decode(q.shape[0], meta) and self._kernel_decodes(q, meta):
                out = self._paged_decode(q, meta)
                return out.reshape(q.shape[0], self.num_heads * self.head_dim)
        if _use_flash(q):
            out = self._flash(q, k, v, meta)
        else:
            out = self._sdpa(q, k, v, meta)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def rotate_and_cache_(
        self,
        qkv: torch.Tensor,  # [T, Hq + 2Hk, D] this rank's fused q|k|v heads
        num_q_heads: int,
        cos: torch.Tensor,  # [T, 1, rotary_dim/2] qkv.dtype
        sin: torch.Tensor,
        rotary_dim: int,
        meta: AttentionMetadata,
    ) -> bool:
        """Rotate q and k in place and write k and v to the paged cache in one kernel; False
        (nothing done) without a cache, off CUDA, or where the kernel does not fit."""
        cache = self.kv_cache
        if meta.block_tables is None or cache.dim() != 5 or not triton_enabled(qkv):
            return False
        flat_k = cache[0].view(-1, self.num_kv_heads, self.head_dim)
        flat_v = cache[1].view(-1, self.num_kv_heads, self.head_dim)
        if not (
            rotary_kernel.supported(qkv, cos, rotary_dim)
            and rotary_kernel.cache_supported(qkv, num_q_heads, flat_k, flat_v)
        ):
            return False
        # NOTE: every token is written, padding included (see ``_write_cache``)
        rotary_kernel.rotary_cache_(
            qkv, num_q_heads, cos, sin, rotary_dim, flat_k, flat_v, meta.slot_mapping
        )
        return True

    def kernel_fits(self, q: torch.Tensor) -> bool:
        """Whether the Triton decode kernel serves this layer for queries like ``q``: CUDA,
        Triton present, the cache in the query dtype, power-of-two head and block sizes of at
        least 16 (``tl.dot`` tiles)."""
        cache = self.kv_cache
        if triton is None or not q.is_cuda or cache.dim() != 5 or cache.dtype != q.dtype:
            return False
        return all(n >= 16 and n & (n - 1) == 0 for n in (self.head_dim, cache.shape[2]))

    def _kernel_decodes(self, q: torch.Tensor, meta: AttentionMetadata) -> bool:
        return meta.decode_kernel and self.kernel_fits(q)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:  # [B, Hq, D]
        """A pure decode batch (one query per sequence) on the kernel or the SDPA gather."""
        if self._kernel_decodes(q, meta):
            return self._paged_decode(q, meta)
        return self._sdpa_decode(q, meta)

    def _paged_decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        cache = self.kv_cache  # [2, num_blocks, block_size, Hk, D]
        # NOTE: no host sync and no shape that depends on the step's values: with a fixed
        # ``decode_splits`` this launch is CUDA-graph capturable
        return paged_decode_attention(
            q,
            cache[0],
            cache[1],
            meta.block_tables,
            meta.seq_lens_k,
            meta.max_seqlen_k,
            self.scale,
            num_splits=meta.decode_splits,
        )

    def _write_cache(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        cache = self.kv_cache
        flat_k = cache[0].view(-1, self.num_kv_heads, self.head_dim)
        flat_v = cache[1].view(-1, self.num_kv_heads, self.head_dim)
        # NOTE: every token is written, padding included: a padded token's slot is a scratch
        # slot past the blocks the pool hands out (the model runner reserves one block for
        # it). Skipping padding with a mask (slots >= 0) would size the result on the host,
        # a stream sync on CUDA that a CUDA graph cannot capture.
        flat_k.index_copy_(0, slots, k.to(cache.dtype))
        flat_v.index_copy_(0, slots, v.to(cache.dtype))

    def _sdpa(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:  # [T, Hq, D]
        if meta.block_tables is not None and is_pure_decode(q.shape[0], meta):
            return self._sdpa_decode(q, meta)
        return self._sdpa_per_sequence(q, k, v, meta)

    def _sdpa_decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """One new token per sequence: gather every sequence's paged KV with one indexing op
        per K and V, padded to the longest context, and run one batched SDPA with a key-padding
        mask."""
        cache = self.kv_cache  # [2, num_blocks, block_size, Hk, D]
        plan = decode_plan(meta, cache.shape[2], q.device)
        b, length = q.shape[0], plan.keep.shape[-1]
        # one index_select over the block dim copies whole K and V blocks together (advanced
        # indexing on cache[:, blocks] was several times slower on CPU)
        kv = cache.index_select(1, plan.blocks).view(2, b, length, self.num_kv_heads, -1)
        if kv.dtype != q.dtype:
            kv = kv.to(q.dtype)
        k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [B, Hk, L, D]
        return self._attend_one_token(q, k, v, plan.keep)

    def _attend_one_token(
        self,
        q: torch.Tensor,  # [B, Hq, D], one query per sequence
        k: torch.Tensor,  # [B, Hk, L, D]
        v: torch.Tensor,  # [B, Hk, L, D]
        mask: torch.Tensor | None,  # [B, 1, 1, L] bool, True = attend; None = every key
    ) -> torch.Tensor:  # [B, Hq, D]
        # GQA without copying KV: a lone query token's heads that share a KV head become that
        # KV head's query rows (head h = kv * groups + g, the repeat_interleave order), so plain
        # SDPA on [B, Hk, groups, D] is exact on every backend, masked or not.
        b = q.shape[0]
        qg = q.reshape(b, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=self.scale)
        return o.reshape(b, self.num_heads, self.head_dim)

    def _sdpa_per_sequence(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        """Prefill and mixed batches: the one-token sequences of a paged batch together (the
        decode path), every other sequence by one SDPA over its own context."""
        cu = meta.cu_seqlens_q_cpu or meta.cu_seqlens_q.tolist()
        lens_k = meta.seq_lens_k_cpu or meta.seq_lens_k.tolist()
        paged = meta.block_tables is not None
        out = torch.empty_like(q)
        batched = decode_rows(meta) if paged and _batch_decodes(q) else None
        done = set(batched.seqs) if batched is not None else ()
        if batched is not None:
            if isinstance(batched.rows, slice):
                out[batched.rows] = self._decode(q[batched.rows], batched.meta)
            else:
                out.index_copy_(0, batched.rows, self._decode(q[batched.rows], batched.meta))
        for i in range(len(cu) - 1):
            s, e = cu[i], cu[i + 1]
            n_q, n_k = e - s, lens_k[i]
            if n_q == 0 or i in done:
                continue
            if not paged or (n_q == n_k and self.kv_cache.dtype == k.dtype):
                ks, vs = k[s:e], v[s:e]  # the whole context is new: the cache holds these k/v
            else:
                ks, vs = self._gather(meta.block_tables[i], n_k)
            kh, vh = ks.transpose(0, 1)[None].to(q.dtype), vs.transpose(0, 1)[None].to(q.dtype)
            if n_q == 1:
                out[s:e] = self._attend_one_token(q[s:e], kh, vh, None)
            else:
                out[s:e] = self._attend_block(q[s:e], kh, vh)
        return out

    def _attend_block(
        self,
        q: torch.Tensor,  # [n_q, Hq, D], the last n_q tokens of the context
        k: torch.Tensor,  # [1, Hk, n_k, D]
        v: torch.Tensor,  # [1, Hk, n_k, D]
    ) -> torch.Tensor:  # [n_q, Hq, D]
        n_q, n_k = q.shape[0], k.shape[2]
        mask = None
        if n_q != n_k:
            # query j sees keys [0, n_k - n_q + j]; SDPA's is_causal aligns top-left instead.
            # torch's lower-right causal bias runs on the flash / memory-efficient kernels on
            # CUDA without building the [n_q, n_k] mask (CPU materialises it, as before)
            mask = causal_lower_right(n_q, n_k)
        # CUDA half types fuse enable_gqa on the flash kernel, which also takes the lower-right
        # bias (no [n_q, n_k] mask is built); expanding the KV heads instead copies them 12x
        gqa = _native_gqa(q)
        if not gqa:
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        # 4-D inputs keep SDPA on its fused CUDA kernels (3-D ones fall back to math)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            **({"enable_gqa": True} if gqa else {}),
        )
        return o[0].transpose(0, 1)

    def _gather(self, block_table: torch.Tensor, n_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.kv_cache
        block_size = cache.shape[2]
        n_blocks = (n_k + block_size - 1) // block_size
        blocks = block_table[:n_blocks].long()
        ks = cache[0].index_select(0, blocks).reshape(-1, self.num_kv_heads, self.head_dim)
        vs = cache[1].index_select(0, blocks).reshape(-1, self.num_kv_heads, self.head_dim)
        return ks[:n_k], vs[:n_k]

    def _flash(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        if meta.block_tables is None:
            return flash_attn_varlen_func(
                q,
                k,
                v,
                cu_seqlens_q=meta.cu_seqlens_q,
                cu_seqlens_k=meta.cu_seqlens_q,
                max_seqlen_q=meta.max_seqlen_q,
                max_seqlen_k=meta.max_seqlen_q,
                softmax_scale=self.scale,
                causal=True,
            )
        cache = self.kv_cache
        return (
            flash_attn_varlen_func(
                q,
                cache[0],
                cache[1],
                cu_seqlens_q=meta.cu_seqlens_q,
                max_seqlen_q=meta.max_seqlen_q,
                cu_seqlens_k=None,
                seqused_k=meta.seq_lens_k,
                max_seqlen_k=meta.max_seqlen_k,
                block_table=meta.block_tables,
                softmax_scale=self.scale,
                causal=True,
            )
            if _FLASH_PAGED_VARLEN
            else self._sdpa(q, k, v, meta)
        )


def is_pure_decode(num_tokens: int, meta: AttentionMetadata) -> bool:
    """True when each of the batch's sequences brings exactly one new token (no host sync)."""
    return meta.max_seqlen_q == 1 and num_tokens == meta.seq_lens_k.shape[0]


def _native_gqa(q: torch.Tensor) -> bool:
    # SDPA's enable_gqa is only fused by the flash backend (half types on CUDA, no mask or the
    # lower-right causal bias); any other case would drop to the math kernel, slower than
    # expanding the KV heads first.
    return _HAS_ENABLE_GQA and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _probe_enable_gqa() -> bool:
    x = torch.zeros(1, 2, 1, 4)
    try:
        F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
    except TypeError:  # torch without the keyword
        return False
    return True


_HAS_ENABLE_GQA = _probe_enable_gqa()


def _batch_decodes(q: torch.Tensor) -> bool:
    # CUDA: one launch for all decode rows instead of a gather and an SDPA per sequence (which
    # made a mixed step of 128 decodes cost ~1,000 launches a layer). CPU: one masked, padded
    # SDPA measured about 2x slower than 128 unmasked ones (contexts of 600 tokens).
    return q.is_cuda


def _use_flash(q: torch.Tensor) -> bool:
    half = q.dtype in (torch.float16, torch.bfloat16)
    return flash_attn_varlen_func is not None and q.is_cuda and half


# flash-attn 2.x varlen accepts block_table with cu_seqlens_k; keep paged reads on SDPA until
# the engine's GPU issue validates the flash path against the reference on the device.
_FLASH_PAGED_VARLEN = False
