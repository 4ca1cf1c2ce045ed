"""PyTorch's fused CPU flash-attention kernels with their log-sum-exp exposed.

``F.scaled_dot_product_attention`` hides the log-sum-exp; code that splits one attention into
pieces (ring steps, block-sparse query chunks) needs it to merge outputs or to run the fused
backward itself. These are the private ATen ops behind SDPA's CPU flash path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def fused_cpu_ops() -> tuple[Callable, Callable] | None:
    """(forward, backward) of the fused CPU flash kernel, or None where this build lacks them.

    forward(q, k, v, dropout_p, is_causal, *, attn_mask=None, scale=None) -> (out, logsumexp);
    backward(grad_out, q, k, v, out, logsumexp, dropout_p, is_causal, *, attn_mask=None, scale=None)
    -> (dq, dk, dv). Tensors are (B, H, S, D) with equal head counts; ``attn_mask`` is additive and
    of the query's dtype (broadcastable to (B, H, Sq, Sk)).
    """
    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    return (fwd, bwd) if fwd is not None and bwd is not None else None


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype attention accumulates and keeps its log-sum-exp in: fp32, fp64 for fp64 inputs (gradient
    checks; the fused backward refuses a log-sum-exp of another dtype than its inputs')."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def additive_mask(keep: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boolean keep mask -> additive mask of ``dtype`` (0 kept, -inf dropped), same (broadcast) shape."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


def merge_partials(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-merge two partial attentions over disjoint key sets (result in :func:`acc_dtype`).

    Args:
        o1, o2: (..., S, D) partial outputs, each normalised over its own keys.
        lse1, lse2: (..., S) their log-sum-exps; -inf marks a row with no keys.

    Returns:
        (merged output, merged log-sum-exp).
    """
    lse = torch.logaddexp(lse1, lse2)
    w1 = torch.exp(lse1 - lse).nan_to_num(0.0)[..., None]
    w2 = torch.exp(lse2 - lse).nan_to_num(0.0)[..., None]
    acc = acc_dtype(o1)
    return o1.to(acc) * w1 + o2.to(acc) * w2, lse
