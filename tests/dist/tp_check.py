"""Run under torchrun: tensor parallel (2 processes) and tensor x sequence parallel (4 processes:
TP 2 x Ulysses 2, TP 2 x ring 2) vs the unsharded model (logits and every parameter gradient).
Exits 1 on a mismatch."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from common import BF16_TOL_GRAD, BF16_TOL_LOGITS, TOL, finish, forward_backward, random_batch, rel
from longshard.errors import ConfigError
from longshard.models import ModelConfig, Transformer
from longshard.parallel.env import exit_worker
from longshard.parallel.layout import CommCounter, shard_batch, zigzag_positions
from longshard.parallel.ring import apply_ring
from longshard.parallel.tensor_parallel import apply_tensor_parallel
from longshard.parallel.ulysses import apply_ulysses
from longshard.train.plan import param_count
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

S2 = {"name": "s2", "options": {"block": 4, "local_blocks": 1, "vert_stride": 2}}
ATTENTION = [[{"name": "dense"}], [S2, {"name": "linear", "options": {"chunk": 4}}],
             [{"name": "mixed", "options": {"groups": [{"name": "dense", "heads": 2}, {**S2, "heads": 6}]}},
              {"name": "streaming", "options": {"block": 4, "sink": 2, "window": 5, "retrieval_heads": [1]}}],
             [{"name": "dense", "gate": "elementwise"}],
             # PowerAttention: one pattern on every head, so each TP rank's heads read the same blocks
             [{"name": "power", "options": {"block": 4, "local_blocks": 1, "sink_blocks": 1}}]]


def _compare(ref, par, tokens, labels, doc, sh, index, mesh, SP: int, name: str, dtype) -> list[str]:
    """One forward+backward of ``ref`` (full batch) and ``par`` (this rank's shard); logits and every gradient."""
    tol_logits, tol_grad = (BF16_TOL_LOGITS, BF16_TOL_GRAD) if dtype is not None else (TOL, TOL)
    name = f"{name} bf16" if dtype is not None else name
    logits, out, failures = forward_backward(ref, par, tokens, labels, doc, sh, name, dtype)
    if not (e := rel(logits[:, index], out)) <= tol_logits:
        failures.append(f"{name} logits {e:.2e}")
    for (n, p_ref), p_par in zip(ref.named_parameters(), par.parameters()):
        g = p_par.grad
        g = g.full_tensor() if isinstance(g, DTensor) else g.clone()
        if SP > 1:  # each sequence rank's gradient covers its tokens
            dist.all_reduce(g, group=mesh["sp"].get_group())
        if not (e := rel(p_ref.grad, g)) <= tol_grad:
            failures.append(f"{name} grad {n} {e:.2e}")
    return failures


def main() -> int:
    dist.init_process_group("gloo")
    W = dist.get_world_size()
    TP, SP = 2, W // 2
    mesh = init_device_mesh("cpu", (SP, TP), mesh_dim_names=("sp", "tp"))
    s = mesh["sp"].get_local_rank()
    failures = []
    modes = ["none"] if SP == 1 else ["ulysses", "ring"]
    S = 16 * SP
    for mode in modes:
        for attn in ATTENTION:
            if mode == "ring" and attn[0]["name"] == "mixed":
                continue  # mixed layers have no ring form
            for packed in (False, True):
                torch.manual_seed(0)
                cfg = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, max_seq_len=256,
                                  attention=attn)
                ref = Transformer(cfg)
                par = apply_tensor_parallel(copy.deepcopy(ref), mesh["tp"])
                tokens, labels, doc = random_batch(S, packed)
                if mode == "ulysses":
                    apply_ulysses(par, mesh["sp"].get_group(), CommCounter())
                    sh, index = shard_batch(tokens, labels, doc, s, SP), torch.arange(s * 16, (s + 1) * 16)
                elif mode == "ring":
                    apply_ring(par, mesh["sp"].get_group(), CommCounter())
                    sh, index = shard_batch(tokens, labels, doc, s, SP, zigzag=True), zigzag_positions(s, SP, 16)
                else:
                    sh, index = shard_batch(tokens, labels, doc, 0, 1), torch.arange(S)
                name = f"tp={TP} sp={SP} {mode} {[a['name'] for a in attn]} packed={packed}"
                local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in par.parameters())
                if local != param_count(cfg, TP)[0]:  # the planner's per-rank parameter count
                    failures.append(f"{name}: {local} local parameters, planner says {param_count(cfg, TP)[0]}")
                for dtype in (torch.bfloat16, None):  # bf16 autocast, then fp32 (tight)
                    failures += _compare(ref, par, tokens, labels, doc, sh, index, mesh, SP, name, dtype)
    # q/k/v and output biases (Qwen3 / Llama attention_bias): the row-parallel o bias is added once
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=8, n_kv_heads=4, max_seq_len=256, qkv_bias=True,
                      o_bias=True)
    ref = Transformer(cfg)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("bias"):
                p.normal_(std=0.1)  # small: large q/k biases saturate the softmax
    par = apply_tensor_parallel(copy.deepcopy(ref), mesh["tp"])
    tokens, labels, doc = random_batch(S, False)
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in par.parameters())
    if local != param_count(cfg, TP)[0]:
        failures.append(f"biases: {local} local parameters, planner says {param_count(cfg, TP)[0]}")
    for dtype in (torch.bfloat16, None):
        failures += _compare(ref, par, tokens, labels, doc, shard_batch(tokens, labels, doc, 0, 1), torch.arange(S),
                             mesh, 1, "tp biases", dtype)
    # a variant with parameters of its own inside the core attention is refused, naming the field
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=8, n_kv_heads=4, max_seq_len=64,
                      attention=[{"name": "nosa", "options": {"block": 4}}])
    try:
        apply_tensor_parallel(Transformer(cfg), mesh["tp"])
        failures.append("nosa under tensor parallel was accepted")
    except ConfigError as err:
        if "parallel.tp_degree" not in str(err):
            failures.append(f"unclear error: {err}")
    return finish(failures)


if __name__ == "__main__":
    exit_worker(main())
