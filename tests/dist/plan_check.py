"""Run under torchrun with 2 processes: the planner's per-GPU estimate vs the measured peak of a
training step under the dense ring and the sparsity-aware ring (S2), at two sequence lengths."""

from __future__ import annotations

import torch
import torch.distributed as dist
from common import finish
from longshard.parallel.env import exit_worker
from longshard.parallel.layout import shard_batch
from longshard.parallel.ring import apply_ring
from longshard.train.config import load_config
from longshard.train.memory import TensorMemoryTracker
from longshard.train.plan import Layout, estimate
from longshard.train.resolve import resolve_model_config

SMALL = ["model.dim=128", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "train.micro_batch_size=2",
         "train.global_batch_size=2", "model.max_seq_len=1024"]
ATTENTION = {"dense": "model.attention=[{name: dense}]",
             "s2": "model.attention=[{name: s2, options: {block: 16, local_blocks: 2, vert_stride: 2}}]"}
TOL = 0.15  # the planner's stated accuracy


def measured_peak(cfg, rank: int, P: int) -> int:
    """Peak live tensor bytes over two ring training steps (the second one has AdamW states)."""
    from longshard.models import Transformer

    torch.manual_seed(0)
    model = apply_ring(Transformer(cfg.model), dist.group.WORLD)
    model.set_loss_chunking(None if cfg.train.loss_chunk_tokens < 0 else cfg.train.loss_chunk_tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_len + 1), generator=g)
    sh = shard_batch(tokens[:, :-1], tokens[:, 1:], None, rank, P, zigzag=True)
    with TensorMemoryTracker() as mem:
        for p in model.parameters():
            mem.track(p)
        for _ in range(2):
            out = model(sh["tokens"], labels_BS=sh["labels"], position_ids_BS=sh["position_ids"])
            out.loss_sum.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return mem.peak


def main() -> int:
    dist.init_process_group("gloo")
    P, r = dist.get_world_size(), dist.get_rank()
    failures = []
    for name, attention in ATTENTION.items():
        for seq_len in (256, 512):
            cfg = load_config("tiny_lm", [*SMALL, attention, f"train.seq_len={seq_len}",
                                             f"parallel.sp_degree={P}", "parallel.sp_mode=ring"])
            est = estimate(cfg, resolve_model_config(cfg), Layout(1, P, "ring", "ddp", "none", "none"), P)
            peak = measured_peak(cfg, r, P)
            if abs(est.total - peak) > TOL * peak:
                failures.append(f"{name} S={seq_len}: estimate {est.total} vs measured {peak} "
                                f"({est.total / peak - 1:+.1%})")
            elif r == 0:
                print(f"{name} S={seq_len}: estimate {est.total} measured {peak} ({est.total / peak - 1:+.1%})")
    return finish(failures)


if __name__ == "__main__":
    exit_worker(main())
