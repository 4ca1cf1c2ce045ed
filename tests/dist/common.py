"""Shared by the torchrun check scripts: run a reference and a sequence-parallel copy, compare."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

TOL = 1e-5  # fp32; sharding regroups the same sums over heads/blocks/ranks (~1e-7 observed)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-30))


def run_and_compare(ref, par, tokens, labels, doc, shard: dict, index: torch.Tensor, name: str) -> list[str]:
    """Forward+backward the unsharded ``ref`` on the full batch and ``par`` on this rank's ``shard``;
    compare this rank's logits (``index`` = its sequence positions) and every summed parameter gradient."""
    ce = torch.nn.functional.cross_entropy
    logits = ref(tokens, doc_ids_BS=doc)
    ce(logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
    out = par(shard["tokens"], doc_ids_BS=shard["doc_ids"], position_ids_BS=shard["position_ids"])
    ce(out.flatten(0, 1), shard["labels"].flatten(), reduction="sum").backward()
    failures = []
    e = rel(logits[:, index], out)
    if e > TOL:
        failures.append(f"{name} logits {e:.2e}")
    for (n, p_ref), p_par in zip(ref.named_parameters(), par.parameters()):
        grad = p_par.grad.clone()
        dist.all_reduce(grad)  # each rank's gradient covers its tokens; the sum is the full gradient
        if rel(p_ref.grad, grad) > TOL:
            failures.append(f"{name} grad {n} {rel(p_ref.grad, grad):.2e}")
    return failures


def random_batch(S: int, packed: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(tokens, labels, doc_ids or None) of batch 2, the same on every rank (fixed seed)."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (2, S), generator=g)
    labels = torch.randint(0, 64, (2, S), generator=g)
    doc = torch.cumsum((torch.rand(2, S, generator=g) < 0.1).long(), 1) if packed else None
    return tokens, labels, doc


def finish(failures: list[str]) -> int:
    """Report this rank's failures, leave the process group, and give the exit code."""
    for f in failures:
        sys.stderr.write(f"rank {dist.get_rank()}: {f}\n")
    dist.destroy_process_group()
    return 1 if failures else 0
