"""Run under torchrun: zigzag ring attention vs the unsharded model (logits and all grads, comm bytes)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from common import finish, random_batch, run_and_compare
from longshard.kernels.triton_support import interpreting, triton_installed
from longshard.models import ModelConfig, Transformer
from longshard.parallel.env import exit_worker
from longshard.parallel.layout import CommCounter, shard_batch, zigzag_positions
from longshard.parallel.ring import apply_ring


def main() -> int:
    dist.init_process_group("gloo")
    P, r = dist.get_world_size(), dist.get_rank()
    failures = []
    L = 10  # local tokens (2 chunks of 5): odd chunk length
    S = L * P
    # the fused CPU pair kernel; then the Triton pair kernel the ring runs on CUDA (here under Triton's
    # interpreter: TRITON_INTERPRET=1 is in the test environment), on the GQA layout
    cases = [(h, kv, packed, "cpu_fused") for h, kv in ((4, 2), (3, 3), (4, 1))  # GQA, odd head count, MQA
             for packed in (False, True)]
    if P == 2 and triton_installed() and (interpreting() or torch.cuda.is_available()):  # rotation logic is shared
        cases += [(4, 2, packed, "triton") for packed in (False, True)]
    for n_heads, n_kv, packed, backend in cases:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=64, dim=8 * n_heads, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv,
                          max_seq_len=256)
        ref = Transformer(cfg)
        par = apply_ring(copy.deepcopy(ref), dist.group.WORLD, counter := CommCounter(), pair_backend=backend)
        tokens, labels, doc = random_batch(S, packed)
        sh = shard_batch(tokens, labels, doc, r, P, zigzag=True)
        name = f"P={P} H={n_heads}/{n_kv} packed={packed} {backend}"
        failures += run_and_compare(ref, par, tokens, labels, doc, sh, zigzag_positions(r, P, L), name,
                                    counter=counter)
        # per layer: forward K and V each hop P-1 times; backward K, V (P-1 hops) + dK, dV (P hops)
        kv_bytes = 2 * n_kv * L * 8 * 4  # B=2, head_dim 8, fp32
        expect = 2 * (2 * (P - 1) * kv_bytes + 2 * (P - 1) * kv_bytes + 2 * P * kv_bytes)
        if counter.bytes["ring_p2p"] != expect:
            failures.append(f"{name} ring bytes {counter.bytes['ring_p2p']} != analytic {expect}")
        declared = sum(layer.attention.core_attention.analytic_bytes(2, S, 4) for layer in par.layers)
        if declared != expect:  # the formula the run report's dense-ring baseline uses
            failures.append(f"{name} RingAttention.analytic_bytes {declared} != {expect}")
    # linear attention under the ring layout: the recurrent states of both zigzag chunks of every rank
    # travel in one all-gather; each chunk starts from the decayed state of all chunks before it
    for n_heads, n_kv in ((4, 2), (3, 3)):
        for packed in (False, True):
            torch.manual_seed(0)
            cfg = ModelConfig(vocab_size=64, dim=8 * n_heads, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv,
                              max_seq_len=256, attention=[{"name": "linear", "options": {"chunk": 2}}])
            ref = Transformer(cfg)
            par = apply_ring(copy.deepcopy(ref), dist.group.WORLD, counter := CommCounter())
            tokens, labels, doc = random_batch(S, packed)
            sh = shard_batch(tokens, labels, doc, r, P, zigzag=True)
            name = f"P={P} linear H={n_heads}/{n_kv} packed={packed}"
            failures += run_and_compare(ref, par, tokens, labels, doc, sh, zigzag_positions(r, P, L), name,
                                        counter=counter)
            expect = 2 * (P - 1) * 2 * 2 * n_heads * 8 * 8 * 4  # layers x peers x chunks x (B, H, D, D) fp32
            if dict(counter.bytes) != {"all_gather": expect}:
                failures.append(f"{name} state bytes {dict(counter.bytes)} != analytic {expect}")
    return finish(failures)


if __name__ == "__main__":
    exit_worker(main())
