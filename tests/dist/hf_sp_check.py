"""Run under torchrun: a transformers causal LM under longshard's sequence parallelism vs unsharded.

For transformers' Qwen2 (14/2 heads at P=2, 8/2 at P=4) and Llama with dense and S2 layers, in
Ulysses, ring (dense: ring attention; S2: the sparsity-aware exchange) and, at P=4, hybrid 2 x 2:
with packed documents, the loss of each rank's shard (``num_items_in_batch`` from
``shard_inputs``) averaged over the ranks equals the unsharded model's mean loss, and the gradients
averaged over the ranks (what DDP does) equal its gradients, fp32 and bf16. Exits 1 on a mismatch.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from common import BF16_TOL_GRAD, BF16_TOL_LOGITS, TOL, finish, rel
from longshard.parallel.env import exit_worker

# this folder holds no `kernels` module, but keep transformers' own import path clean of the repo root
import longshard.models.hf_attention  # noqa: F401  (registers "longshard")

S2 = {"name": "s2", "options": {"block": 4, "local_blocks": 1, "vert_stride": 2}}


def build(arch: str, heads: tuple[int, int]):
    import transformers

    h, kv = heads
    common = dict(vocab_size=97, hidden_size=16 * h, intermediate_size=64, num_hidden_layers=2, num_attention_heads=h,
                  num_key_value_heads=kv, max_position_embeddings=256, head_dim=16)
    cfg = (transformers.Qwen2Config if arch == "qwen2" else transformers.LlamaConfig)(**common)
    cfg.longshard_attention = [S2, {"name": "dense"}]
    torch.manual_seed(0)
    model = (transformers.Qwen2ForCausalLM if arch == "qwen2" else transformers.LlamaForCausalLM)(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 and p.shape[0] == 16 else 0.0))
    model.set_attn_implementation("longshard")
    return model.train()


def check(arch: str, heads: tuple[int, int], mode: str, dtype: torch.dtype | None) -> list[str]:
    from longshard.parallel.hf import sequence_parallel, shard_inputs

    P, rank = dist.get_world_size(), dist.get_rank()
    ref = build(arch, heads)
    par = copy.deepcopy(ref)
    B, S = 2, 16 * P  # zigzag chunks (S / 2P) of whole S2 blocks (4)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 97, (B, S), generator=g)
    doc = torch.zeros(B, S, dtype=torch.long)
    doc[0, 19:] = 1  # row 0: two documents, row 1: one
    pos = torch.cat([torch.arange(19), torch.arange(S - 19)])[None].repeat(B, 1)
    pos[1] = torch.arange(S)
    shifted = torch.full_like(tokens, -100)
    shifted[:, :-1] = tokens[:, 1:]
    shifted[:, :-1] = shifted[:, :-1].masked_fill(doc[:, 1:] != doc[:, :-1], -100)
    autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=dtype is not None)
    with torch.autocast(**autocast):
        loss_ref = ref(tokens, position_ids=pos, labels=shifted, shift_labels=shifted, use_cache=False).loss
    loss_ref.backward()
    if mode == "hybrid":
        ring_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
        uly_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        shard = sequence_parallel(par, ring_groups[rank % 2], "hybrid", ulysses_group=uly_groups[rank // 2])
    else:
        shard = sequence_parallel(par, dist.group.WORLD, mode)
    batch = shard_inputs(shard, tokens, doc_ids=doc)
    with torch.autocast(**autocast):
        loss = par(**batch).loss
    loss.backward()
    what = f"{arch} {heads} {mode} {'bf16' if dtype else 'fp32'}"
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    mean /= P
    tol_l, tol_g = (BF16_TOL_LOGITS, BF16_TOL_GRAD) if dtype else (TOL, TOL * 10)
    failures = []
    if rel(loss_ref.detach(), mean) > tol_l:
        failures.append(f"{what}: loss {float(mean):.6f} vs unsharded {float(loss_ref):.6f}")
    for (name, p_ref), (_, p_par) in zip(ref.named_parameters(), par.named_parameters()):
        grad = p_par.grad.detach().clone() if p_par.grad is not None else torch.zeros_like(p_par)
        dist.all_reduce(grad)
        grad /= P
        err = rel(p_ref.grad, grad)
        if err > tol_g:
            failures.append(f"{what}: grad {name} rel err {err:.2e}")
    return failures


def main() -> int:
    dist.init_process_group("gloo")
    P = dist.get_world_size()
    heads = (14, 2) if P == 2 else (8, 2)
    modes = ["ulysses", "ring"] + (["hybrid"] if P == 4 else [])
    failures = []
    for arch in ("qwen2", "llama"):
        for mode in modes:
            for dtype in (None, torch.bfloat16):
                if arch == "llama" and dtype is not None:
                    continue  # bf16 once per mode is enough on this 2-core budget
                failures += check(arch, heads if arch == "qwen2" else (4, 2) if P == 2 else (8, 2), mode, dtype)
    if dist.get_rank() == 0 and not failures:
        sys.stdout.write(f"hf sequence parallel P={P}: {', '.join(modes)} match\n")
    return finish(failures)


if __name__ == "__main__":
    exit_worker(main())
