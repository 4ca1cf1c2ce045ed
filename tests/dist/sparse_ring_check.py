"""Run under torchrun: sparsity-aware context parallelism (zigzag shards, only the read K/V blocks move)
vs the unsharded model, for S2, streaming heads and sliding window: logits, every gradient, bytes."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from common import finish, random_batch, run_and_compare
from longshard.models import ModelConfig, Transformer
from longshard.parallel.env import exit_worker
from longshard.parallel.layout import CommCounter, shard_batch, zigzag_positions
from longshard.parallel.ring import apply_ring, sparse_exchange_traffic
from longshard.parallel.sparse_exchange import SparseExchangeAttention

VARIANTS = [
    ("s2", {"block": 4, "local_blocks": 2, "vert_stride": 4}, 4, 4),
    ("s2", {"block": 4, "local_blocks": 1, "vert_stride": 2, "sink_blocks": 1}, 4, 2),
    ("streaming", {"block": 4, "sink": 3, "window": 6, "retrieval_heads": [1]}, 4, 2),
    ("sliding_window", {"block": 4, "window": 5}, 3, 1),
    ("power", {"block": 4, "local_blocks": 1}, 4, 2),
]


def main() -> int:
    dist.init_process_group("gloo")
    P, r = dist.get_world_size(), dist.get_rank()
    failures = []
    blk = 4
    S = 2 * P * blk * 3  # three blocks per zigzag chunk
    L = S // P
    for name, opts, n_heads, n_kv in VARIANTS:
        for packed in (False, True):
            torch.manual_seed(0)
            cfg = ModelConfig(vocab_size=64, dim=8 * n_heads, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv,
                              max_seq_len=256, attention=[{"name": name, "options": dict(opts, path="naive")}])
            ref = Transformer(cfg)
            par = apply_ring(copy.deepcopy(ref), dist.group.WORLD, counter := CommCounter())
            tokens, labels, doc = random_batch(S, packed)
            sh = shard_batch(tokens, labels, doc, r, P, zigzag=True)
            label = f"{name} P={P} H={n_heads}/{n_kv} packed={packed}"
            failures += run_and_compare(ref, par, tokens, labels, doc, sh, zigzag_positions(r, P, L), label,
                                        counter=counter)
            cores = [layer.attention.core_attention for layer in par.layers]
            assert all(isinstance(c, SparseExchangeAttention) for c in cores)
            # forward sends the blocks peers read, backward returns the gradients of the blocks read
            expect = sum(c.analytic_bytes(2, S, 4) for c in cores)
            dense_ring = 2 * (2 * (P - 1) + 2 * (P - 1) + 2 * P) * (2 * n_kv * L * 8 * 4)  # ring_check's formula
            got = counter.bytes["sparse_kv"]
            if got != expect:
                failures.append(f"{label} bytes {got} != analytic {expect}")
            traffic = sparse_exchange_traffic(par, 2, S, 4)
            if traffic != {"layers": 2, "sparse_exchange_bytes": expect, "dense_ring_bytes": dense_ring}:
                failures.append(f"{label} sparse_exchange_traffic {traffic} != ({expect}, {dense_ring})")
            if P > 1 and not got < dense_ring:
                failures.append(f"{label} sparse bytes {got} not below dense ring {dense_ring}")
            if r == 0 and not packed:
                sys.stdout.write(f"{label}: sparse {got} B vs dense ring {dense_ring} B\n")
    return finish(failures)


if __name__ == "__main__":
    exit_worker(main())
