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
