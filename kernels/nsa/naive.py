"""Reference NSA branches: compressed, selected and sliding-window attention with full masks."""

from __future__ import annotations

import torch
from longshard.kernels.attention.naive import attention_naive
from longshard.kernels.nsa.select import (
    NSAGeometry,
    compressed_attention,
    compressed_valid,
    select_blocks,
    selected_token_mask,
    window_token_mask,
)


def nsa_branches_naive(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    k_cmp_BKCD: torch.Tensor,
    v_cmp_BKCD: torch.Tensor,
    geo: NSAGeometry,
    scale: float,
    doc_ids_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three NSA branch outputs, each (B, H, Sq, D), computed with explicit score matrices.

    Args:
        q_BHSD: queries (the last Sq of the Sk positions).
        k_BHSD, v_BHSD: (B, Hkv, Sk, D) keys/values.
        k_cmp_BKCD, v_cmp_BKCD: (B, Hkv, nC, D) compressed summaries.
        geo: block sizes.
        scale: softmax scale.
        doc_ids_BS: (B, Sk) document ids, or None.
    """
    Sq, Sk, H, Hkv = q_BHSD.shape[2], k_BHSD.shape[2], q_BHSD.shape[1], k_BHSD.shape[1]
    valid = compressed_valid(geo, Sq, Sk, doc_ids_BS, q_BHSD.device)
    o_cmp, p_cmp = compressed_attention(q_BHSD, k_cmp_BKCD, v_cmp_BKCD, valid, scale)
    idx, ok = select_blocks(geo, p_cmp, Hkv, Sq, Sk)
    o_slc = attention_naive(q_BHSD, k_BHSD, v_BHSD, selected_token_mask(geo, idx, ok, H, Sk, doc_ids_BS), scale)
    o_win = attention_naive(q_BHSD, k_BHSD, v_BHSD, window_token_mask(geo, Sq, Sk, doc_ids_BS, q_BHSD.device),
                            scale)
    return o_cmp, o_slc, o_win
