"""Shared by the torchrun check scripts: run a reference and a sequence-parallel copy, compare."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

TOL = 1e-5  # fp32; sharding regroups the same sums over heads/blocks/ranks (~1e-7 observed)
# bf16 autocast: the sharded and unsharded runs round different partial sums to bf16 (8-bit mantissa,
# eps 2^-8 = 3.9e-3); logits differ by a few eps, summed gradients by more (cancellation in small
# entries relative to the largest one). Observed <= 2e-2 logits, <= 6e-2 grads on these tiny models.
BF16_TOL_LOGITS, BF16_TOL_GRAD = 5e-2, 1.5e-1


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-30))


def core_dtypes(model) -> tuple[list, list]:
    """Forward pre-hooks recording the dtypes of (q, k, v) every core attention of ``model`` receives."""
    from longshard.models.attention import CoreAttention

    seen, handles = [], []
    for m in model.modules():
        if isinstance(m, CoreAttention):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args: seen.append((type(mod).__name__, *(a.dtype for a in args[:3])))))
    return seen, handles


def forward_backward(ref, par, tokens, labels, doc, shard: dict, name: str, dtype: torch.dtype | None):
    """Fresh-gradient forward+backward of ``ref`` (full batch) and ``par`` (``shard``) under ``dtype``
    autocast (None = fp32); returns (ref logits, par logits, failures of the core-dtype check)."""
    ce = torch.nn.functional.cross_entropy
    for m in (ref, par):
        m.zero_grad(set_to_none=True)
    seen, handles = core_dtypes(par)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = ref(tokens, doc_ids_BS=doc)
        ce(logits.float().flatten(0, 1), labels.flatten(), reduction="sum").backward()
        out = par(shard["tokens"], doc_ids_BS=shard["doc_ids"], position_ids_BS=shard["position_ids"])
        ce(out.float().flatten(0, 1), shard["labels"].flatten(), reduction="sum").backward()
    for h in handles:
        h.remove()
    want = dtype or torch.float32
    failures = []
    if not seen or any(d != want for rec in seen for d in rec[1:]):
        failures.append(f"{name} core attention inputs {sorted(set(seen), key=str)} are not all {want}")
    return logits, out, failures


def _step(ref, par, tokens, labels, doc, shard: dict, index: torch.Tensor, name: str, dtype: torch.dtype | None,
          tol_logits: float, tol_grad: float) -> list[str]:
    logits, out, failures = forward_backward(ref, par, tokens, labels, doc, shard, name, dtype)
    e = rel(logits[:, index], out)
    if not e <= tol_logits:
        failures.append(f"{name} logits {e:.2e}")
    for (n, p_ref), p_par in zip(ref.named_parameters(), par.parameters()):
        grad = p_par.grad.clone()
        dist.all_reduce(grad)  # each rank's gradient covers its tokens; the sum is the full gradient
        if not rel(p_ref.grad, grad) <= tol_grad:
            failures.append(f"{name} grad {n} {rel(p_ref.grad, grad):.2e}")
    return failures


def run_and_compare(ref, par, tokens, labels, doc, shard: dict, index: torch.Tensor, name: str,
                    counter=None) -> list[str]:
    """Forward+backward the unsharded ``ref`` on the full batch and ``par`` on this rank's ``shard``;
    compare this rank's logits (``index`` = its sequence positions) and every summed parameter gradient,
    under bf16 autocast (every core attention must receive bf16 q, k, v) and then in fp32 (tight).
    ``counter`` (the wrapper's CommCounter) is reset between the two, so it holds the fp32 step's traffic."""
    failures = _step(ref, par, tokens, labels, doc, shard, index, f"{name} bf16", torch.bfloat16,
                     BF16_TOL_LOGITS, BF16_TOL_GRAD)
    if counter is not None:
        counter.reset()
    return failures + _step(ref, par, tokens, labels, doc, shard, index, name, None, TOL, TOL)


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
