"""Run under torchrun with 4 processes: hybrid 2-D (Ulysses 2 x ring 2) vs the unsharded model."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from common import finish, random_batch, run_and_compare
from longshard.models import ModelConfig, Transformer
from longshard.parallel.ring import apply_ring
from longshard.parallel.sequence import CommCounter, shard_batch
from torch.distributed.device_mesh import init_device_mesh


def main() -> int:
    dist.init_process_group("gloo")
    r = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "uly"))
    failures = []
    S = 40  # 4 zigzag chunks of 10 per ring rank pair; 10 tokens per process
    for n_heads, n_kv in ((4, 2), (4, 1)):
        for packed in (False, True):
            torch.manual_seed(0)
            cfg = ModelConfig(vocab_size=64, dim=8 * n_heads, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv,
                              max_seq_len=256)
            ref = Transformer(cfg)
            par = apply_ring(copy.deepcopy(ref), mesh["ring"].get_group(), CommCounter(),
                             ulysses_group=mesh["uly"].get_group())
            tokens, labels, doc = random_batch(S, packed)
            sh = shard_batch(tokens, labels, doc, r, 4, zigzag=True, inner=2)
            failures += run_and_compare(ref, par, tokens, labels, doc, sh, _index(r),
                                        f"hybrid H={n_heads}/{n_kv} packed={packed}")
    return finish(failures)


def _index(rank: int) -> torch.Tensor:
    """Sequence indices of this rank's tokens: its half of ring rank r // 2's zigzag shard."""
    from longshard.parallel.sequence import zigzag_positions

    shard = zigzag_positions(rank // 2, 2, 20)
    return shard[(rank % 2) * 10 : (rank % 2 + 1) * 10]


if __name__ == "__main__":
    sys.exit(main())
