"""Run under torchrun: Ulysses sequence parallel vs the unsharded model (logits and all grads).

Every rank builds the same model and computes the single-process reference itself; then a copy
runs with its attention behind all-to-alls on this rank's sequence shard. Exits 1 on a mismatch.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from common import TOL, finish, random_batch, rel, run_and_compare
from longshard.errors import ConfigError
from longshard.models import ModelConfig, Transformer
from longshard.parallel.env import exit_worker
from longshard.parallel.layout import CommCounter, shard_batch
from longshard.parallel.ulysses import apply_ulysses

S2 = {"name": "s2", "options": {"block": 4, "local_blocks": 1, "vert_stride": 2}}
# per-KV-head importance parameters: each rank uses (and gets gradients for) its heads' slice
NOSA = {"name": "nosa", "options": {"block": 4, "sink_blocks": 1, "local_blocks": 1, "query_blocks": 1,
                                    "static_blocks": 1}}
# input-dependent gates: computed on the sequence shard, exchanged with one more all-to-all
NSA = {"name": "nsa", "options": {"compress_block": 4, "compress_stride": 2, "select_block": 4, "n_select": 3,
                                  "n_local": 1, "window": 5}}
GATED_STREAMING = {"name": "streaming_gated", "options": {"block": 4, "sink": 2, "window": 5}}
POWER = {"name": "power", "options": {"block": 4, "local_blocks": 1, "sink_blocks": 1}}
# per-KV-head bias parameters (A, Delta); its selection reads only its KV head's values, so a rank may run
# part of a GQA group (4 ranks, 8/2 heads: KV heads replicated)
DMA = {"name": "dma", "options": {"block": 4, "keep_blocks": 2, "a_init": 0.5, "delta_std": 1.0}}
# routed on each sequence shard (all heads there), gates exchanged per head; the load-balance loss in
# shares per head slice. P=2 (4 heads): rank 0 runs the shared head and a routed one
MOH2 = {"name": "moh", "options": {"shared_heads": 1, "top_k": 2, "router_std": 0.5}}
MOH4 = {"name": "moh", "options": {"shared_heads": 2, "top_k": 3, "router_std": 0.5}}  # rank 0: shared only


def mixed(*groups) -> dict:
    return {"name": "mixed", "options": {"groups": [dict(g) for g in groups]}}


CASES = {
    2: dict(n_heads=4, n_kv_heads=2, attn=[{"name": "dense"}, S2,
                                          {"name": "streaming", "options": {"block": 4, "sink": 2, "window": 5,
                                                                            "retrieval_heads": [1]}},
                                          {"name": "sliding_window", "options": {"block": 4, "window": 6}},
                                          {"name": "linear", "options": {"chunk": 4}}, NOSA, NSA, GATED_STREAMING, POWER, DMA, MOH2,
                                          # each rank runs one group: the other's parameters get zero gradients
                                          mixed({"name": "dense", "heads": 2}, {**NSA, "heads": 2})]),
    3: dict(n_heads=6, n_kv_heads=3, attn=[{"name": "dense"}, S2, {"name": "linear", "options": {"chunk": 8}}, NSA,
                                          # rank 1's slice straddles both groups
                                          mixed({**S2, "heads": 4}, {"name": "linear", "heads": 2})]),
    4: dict(n_heads=8, n_kv_heads=2, attn=[{"name": "dense"}, S2, GATED_STREAMING, POWER, DMA, MOH4,  # KV replicated 2x
                                          mixed({"name": "dense", "heads": 4}, {**S2, "heads": 4})],
            # selection shared by a GQA group of 4 query heads cannot run on 2 of them: a clear error
            rejected=[NOSA, NSA]),
}
FEATURES = {"nsa": 3, "moh": 3}  # per-head input features each query head exchanges (gate logits; MoH's gate,
# choice and router probability)


def feature_width(spec: dict) -> int:
    if spec["name"] == "mixed":
        return max(FEATURES.get(g["name"], 0) for g in spec["options"]["groups"])
    return FEATURES.get(spec["name"], 0)


def compare_aux(ref, par, tokens, doc, shard: dict, name: str) -> list[str]:
    """The load-balance loss alone: the ranks' mean equals the unsharded loss, and so do the gradients of
    their mean (summed over ranks / P, as data parallel averages)."""
    P = dist.get_world_size()
    for m in (ref, par):
        m.zero_grad(set_to_none=True)
    ref(tokens, doc_ids_BS=doc)
    a_ref = ref.aux_loss()
    a_ref.backward()
    par(shard["tokens"], doc_ids_BS=shard["doc_ids"], position_ids_BS=shard["position_ids"])
    a_par = par.aux_loss()
    a_par.backward()
    mean = a_par.detach().clone()
    dist.all_reduce(mean)
    failures = [] if rel(a_ref.detach(), mean / P) <= TOL else [f"{name} aux {float(a_ref)} != {float(mean / P)}"]
    for (n, p_ref), p_par in zip(ref.named_parameters(), par.parameters()):
        g_ref = torch.zeros_like(p_ref) if p_ref.grad is None else p_ref.grad
        g = torch.zeros_like(p_par) if p_par.grad is None else p_par.grad.clone()
        dist.all_reduce(g)
        if g_ref.abs().max() > 0 and not rel(g_ref, g / P) <= TOL:
            failures.append(f"{name} aux grad {n} {rel(g_ref, g / P):.2e}")
        elif g_ref.abs().max() == 0 and g.abs().max() > 0:
            failures.append(f"{name} aux grad {n} nonzero where the unsharded one is 0")
    if not any(p.grad is not None and p.grad.abs().max() > 0 for p in ref.parameters()):
        failures.append(f"{name} the balance loss reaches no parameter")
    return failures


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
            failures += run_and_compare(ref, par, tokens, labels, doc, sh, torch.arange(r * 12, (r + 1) * 12), name,
                                        counter=counter)
            # 2 layers x 3 (q, k, v) + 2 x 1 (o) all-to-alls forward, each sending (P-1)/P of the local tensor
            B, D = 2, 16
            kv_local = max(case["n_kv_heads"], P)
            per_layer = (P - 1) / P * 4 * B * 12 * D * (2 * case["n_heads"] + 2 * kv_local)
            if spec["name"] == "linear":  # state passing: one all-gather of (B, H, D, D) fp32 states per layer
                expect = {"all_gather": 2 * (P - 1) * B * case["n_heads"] * D * D * 4}
                calls = {"all_gather": 2}
            else:
                F = feature_width(spec)
                per_layer += (P - 1) / P * 4 * B * 12 * case["n_heads"] * F
                expect, calls = {"all_to_all": int(2 * per_layer)}, {"all_to_all": 8 + (2 if F else 0)}
            if dict(counter.bytes) != expect or dict(counter.calls) != calls:
                failures.append(f"{name} comm {dict(counter.bytes)} {dict(counter.calls)} != {expect} {calls}")
            if spec["name"] == "moh":
                failures += compare_aux(ref, par, tokens, doc, sh, name)
    for spec in case.get("rejected", []):
        cfg = ModelConfig(vocab_size=64, dim=16 * case["n_heads"], n_layers=1, n_heads=case["n_heads"],
                          n_kv_heads=case["n_kv_heads"], max_seq_len=256, attention=[spec])
        try:
            apply_ulysses(Transformer(cfg), dist.group.WORLD)
            failures.append(f"P={P} {spec['name']} splitting a GQA group was accepted")
        except ConfigError as err:
            if "GQA group" not in str(err):
                failures.append(f"unclear error: {err}")
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
    exit_worker(main())
