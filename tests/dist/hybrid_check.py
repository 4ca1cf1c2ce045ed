"""Run under torchrun with 4 processes: hybrid 2-D (Ulysses 2 x ring 2) vs the unsharded model."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from longshard.models import ModelConfig, Transformer
from longshard.parallel.ring import apply_ring
from longshard.parallel.sequence import CommCounter, shard_batch

TOL = 1e-5  # fp32; sums regrouped over heads and ring blocks only


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-30))


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
            g = torch.Generator().manual_seed(1)
            tokens = torch.randint(0, 64, (2, S), generator=g)
            labels = torch.randint(0, 64, (2, S), generator=g)
            doc = torch.cumsum((torch.rand(2, S, generator=g) < 0.1).long(), 1) if packed else None
            logits = ref(tokens, doc_ids_BS=doc)
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
            sh = shard_batch(tokens, labels, doc, r, 4, zigzag=True, inner=2)
            out = par(sh["tokens"], doc_ids_BS=sh["doc_ids"], position_ids_BS=sh["position_ids"])
            torch.nn.functional.cross_entropy(out.flatten(0, 1), sh["labels"].flatten(), reduction="sum").backward()
            name = f"hybrid H={n_heads}/{n_kv} packed={packed}"
            e = rel(logits[:, _index(r)], out)
            if e > TOL:
                failures.append(f"{name} logits {e:.2e}")
            for (n, p_ref), p_par in zip(ref.named_parameters(), par.parameters()):
                grad = p_par.grad.clone()
                dist.all_reduce(grad)
                if rel(p_ref.grad, grad) > TOL:
                    failures.append(f"{name} grad {n} {rel(p_ref.grad, grad):.2e}")
    for f in failures:
        sys.stderr.write(f"rank {r}: {f}\n")
    dist.destroy_process_group()
    return 1 if failures else 0


def _index(rank: int) -> torch.Tensor:
    """Sequence indices of this rank's tokens: its half of ring rank r // 2's zigzag shard."""
    from longshard.parallel.sequence import zigzag_positions

    shard = zigzag_positions(rank // 2, 2, 20)
    return shard[(rank % 2) * 10 : (rank % 2 + 1) * 10]


if __name__ == "__main__":
    sys.exit(main())
