"""Run under torchrun: Ulysses sequence parallel vs the unsharded model (logits and all grads).

Every rank builds the same model and computes the single-process reference itself; then a copy
runs with its attention behind all-to-alls on this rank's sequence shard. Exits 1 on a mismatch.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from common import finish, random_batch, run_and_compare
from longshard.errors import ConfigError
from longshard.models import ModelConfig, Transformer
from longshard.parallel.sequence import CommCounter, apply_ulysses, shard_batch

S2 = {"name": "s2", "options": {"block": 4, "local_blocks": 1, "vert_stride": 2}}
CASES = {
    2: dict(n_heads=4, n_kv_heads=2, attn=[{"name": "dense"}, S2,
                                          {"name": "streaming", "options": {"block": 4, "sink": 2, "window": 5,
                                                                            "retrieval_heads": [1]}},
                                          {"name": "sliding_window", "options": {"block": 4, "window": 6}},
                                          {"name": "linear", "options": {"chunk": 4}}]),
    3: dict(n_heads=6, n_kv_heads=3, attn=[{"name": "dense"}, S2, {"name": "linear", "options": {"chunk": 8}}]),
    4: dict(n_heads=8, n_kv_heads=2, attn=[{"name": "dense"}, S2]),  # KV heads replicated 2x
}


def main() -> int:
    dist.init_process_group("gloo")
    P, r = dist.get_world_size(), dist.get_rank()
    case = CASES[P]
    S = 12 * P  # each rank holds 12 tokens
    failures = []
    for packed in (False, True):
        for spec in case["attn"]:
            torch.manual_seed(0)
            cfg = ModelConfig(vocab_size=64, dim=16 * case["n_heads"], n_layers=2, n_heads=case["n_heads"],
                              n_kv_heads=case["n_kv_heads"], max_seq_len=256, attention=[spec])
            ref = Transformer(cfg)
            par = apply_ulysses(copy.deepcopy(ref), dist.group.WORLD, counter := CommCounter())
            tokens, labels, doc = random_batch(S, packed)
            sh = shard_batch(tokens, labels, doc, r, P)
            name = f"P={P} {spec['name']} packed={packed}"
            failures += run_and_compare(ref, par, tokens, labels, doc, sh, torch.arange(r * 12, (r + 1) * 12), name)
            # 2 layers x 3 (q, k, v) + 2 x 1 (o) all-to-alls forward, each sending (P-1)/P of the local tensor
            B, D = 2, 16
            kv_local = max(case["n_kv_heads"], P)
            per_layer = (P - 1) / P * 4 * B * 12 * D * (2 * case["n_heads"] + 2 * kv_local)
            if spec["name"] == "linear":  # state passing: one all-gather of (B, H, D, D) fp32 states per layer
                expect = {"all_gather": 2 * (P - 1) * B * case["n_heads"] * D * D * 4}
                calls = {"all_gather": 2}
            else:
                expect, calls = {"all_to_all": int(2 * per_layer)}, {"all_to_all": 8}
            if dict(counter.bytes) != expect or dict(counter.calls) != calls:
                failures.append(f"{name} comm {dict(counter.bytes)} {dict(counter.calls)} != {expect} {calls}")
    if P == 3:  # 2 KV heads can neither be split over nor replicated to 3 ranks
        cfg = ModelConfig(vocab_size=64, dim=96, n_layers=1, n_heads=6, n_kv_heads=2, max_seq_len=64)
        try:
            apply_ulysses(Transformer(cfg), dist.group.WORLD)
            failures.append("P=3 with 2 KV heads was accepted")
        except ConfigError as err:
            if "parallel.sp_degree" not in str(err):
                failures.append(f"unclear error: {err}")
    return finish(failures)


if __name__ == "__main__":
    sys.exit(main())
