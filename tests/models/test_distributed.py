"""Tensor and expert parallelism: two gloo ranks on localhost give the single-process logits.

Each rank loads the checkpoint sharded for its rank (attention heads, MLP widths, lm_head vocab
rows, and the routed experts either sliced (TP) or split whole (EP)) and runs the same flat batch.
A second checkpoint has a single KV head, so both ranks hold a replica of it (GQA replication).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from models.distributed import destroy_distributed, get_tp_size, init_distributed
from models.glm4v.loader import load_model
from models.layers.attention import AttentionMetadata

WORLD = 2
LENS = [6, 11, 1]


def _batch() -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 200, (sum(LENS),), generator=gen)
    pos = torch.cat([torch.arange(n) for n in LENS])[None].expand(3, -1)
    return ids, pos, AttentionMetadata.prefill(LENS)


@torch.inference_mode()
def _logits(ckpt: Path) -> torch.Tensor:
    model = load_model(ckpt, dtype=torch.float32, device="cpu", vision=False)
    ids, pos, meta = _batch()
    return model.compute_logits(model(ids, pos, meta))


def _worker(rank: int, port: int, ckpts: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    for ep in (False, True):
        init_distributed("gloo", WORLD, rank, f"tcp://127.0.0.1:{port}", expert_parallel=ep)
        assert get_tp_size() == WORLD
        for i, ckpt in enumerate(ckpts):
            logits = _logits(Path(ckpt))
            if rank == 0:
                torch.save(logits, Path(out_dir) / f"ckpt{i}_ep{int(ep)}.pt")
    destroy_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_kv_head_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # imported here so the spawned ranks, which import this module, skip transformers
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    torch.manual_seed(2)
    text = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, moe_intermediate_size=32,
        n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=512, eos_token_id=[1], pad_token_id=0,
        rope_parameters=dict(
            rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1],
            partial_rotary_factor=0.5,
        ),
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=32, num_heads=2, out_hidden_size=64, image_size=56)
    model = Glm4vMoeForConditionalGeneration(
        Glm4vMoeConfig(text_config=text, vision_config=vision, image_token_id=250)
    )
    out = tmp_path_factory.mktemp("one_kv_head")
    model.save_pretrained(out)
    return out


def test_tp2_and_ep2_match_single_process(
    tiny_ckpt_45: Path, one_kv_head_ckpt: Path, tmp_path: Path
) -> None:
    ckpts = [tiny_ckpt_45, one_kv_head_ckpt]
    mp.spawn(
        _worker,
        args=(_free_port(), [str(c) for c in ckpts], str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    assert get_tp_size() == 1  # the test process itself never joined a group
    for i, ckpt in enumerate(ckpts):
        single = _logits(ckpt)
        for ep in (0, 1):
            sharded = torch.load(tmp_path / f"ckpt{i}_ep{ep}.pt")
            assert sharded.shape == single.shape
            assert (sharded - single).abs().max().item() <= 1e-5, (ckpt.name, ep)
