"""Reference MoH attention: every head computed (full score matrices), then weighted by its gate."""

from __future__ import annotations

import torch
from longshard.kernels.attention.naive import attention_naive, causal_doc_mask
from longshard.kernels.moh.gates import MoHGates


def moh_attention_naive(q_BHSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, gates: MoHGates,
                        scale: float, doc_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
    """``out_h = g_h * attention_h`` for every head (the MoH reference computes all heads and zeroes
    the ones not chosen; so does this specification).

    Args:
        q_BHSD: queries, the last Sq of the Sk positions; k_BKSD, v_BKSD: (B, K, Sk, D).
        gates: the head weights of the Sq query tokens (:func:`~longshard.kernels.moh.gates.moh_gates`).
        scale: softmax scale.
        doc_ids_BS: (B, Sk) document ids, or None.
    """
    Sq, Sk = q_BHSD.shape[2], k_BKSD.shape[2]
    mask = causal_doc_mask(Sq, Sk, doc_ids_BS, q_BHSD.device)
    o = attention_naive(q_BHSD, k_BKSD, v_BKSD, mask, scale)
    return (o.float() * gates.g_BSH.transpose(1, 2)[..., None]).to(q_BHSD.dtype)
