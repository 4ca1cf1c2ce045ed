"""Run under torchrun with 4 processes: hybrid 2-D (Ulysses 2 x ring 2) vs the unsharded model."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from common import finish, random_batch, run_and_compare
from longshard.models import ModelConfig, Transformer
from longshard.parallel.env import exit_worker
from longshard.parallel.layout import CommCounter, shard_batch
from longshard.parallel.ring import apply_ring
from torch.distributed.device_mesh import init_device_mesh


def main() -> int:
    dist.init_process_group("gloo")
    r = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "uly"))
    failures = []
    S = 40  # 4 zigzag chunks of 10 per ring rank pair; 10 tokens per process
    S2 = {"name": "s2", "options": {"block": 5, "local_blocks": 1, "vert_stride": 2}}
    WINDOW = {"name": "sliding_window", "options": {"block": 5, "window": 7}}
    LINEAR = {"name": "linear", "options": {"chunk": 4}}
    cases = [((4, 2), [{"name": "dense"}]), ((4, 1), [{"name": "dense"}]),
             # each Ulysses rank keeps its heads' own sparse pattern / decay inside the ring
             ((4, 2), [S2, WINDOW]),
             ((4, 1), [{"name": "s2", "options": {**S2["options"], "allow_incomplete_coverage": True}}]),
             ((4, 2), [LINEAR, {"name": "dense"}])]
    for (n_heads, n_kv), attn in cases:
        for packed in (False, True):
            torch.manual_seed(0)
            cfg = ModelConfig(vocab_size=64, dim=8 * n_heads, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv,
                              max_seq_len=256, attention=attn)
            ref = Transformer(cfg)
            par = apply_ring(copy.deepcopy(ref), mesh["ring"].get_group(), CommCounter(),
                             ulysses_group=mesh["uly"].get_group())
            tokens, labels, doc = random_batch(S, packed)
            sh = shard_batch(tokens, labels, doc, r, 4, zigzag=True, inner=2)
            failures += run_and_compare(ref, par, tokens, labels, doc, sh, _index(r),
                                        f"hybrid {[a['name'] for a in attn]} H={n_heads}/{n_kv} packed={packed}")
    return finish(failures)


def _index(rank: int) -> torch.Tensor:
    """Sequence indices of this rank's tokens: its half of ring rank r // 2's zigzag shard."""
    from longshard.parallel.layout import zigzag_positions

    shard = zigzag_positions(rank // 2, 2, 20)
    return shard[(rank % 2) * 10 : (rank % 2 + 1) * 10]


if __name__ == "__main__":
    exit_worker(main())
