"""Reference NOSA attention: explicit (B, H, Sq, Sk) keep-mask and bias, plain softmax."""

from __future__ import annotations

import torch
from longshard.kernels.nosa.select import (
    NOSAGeometry,
    block_summaries,
    importance_bias,
    read_slots,
    select_far_blocks,
)


def nosa_token_mask_bias(
    geo: NOSAGeometry, idx_BKSN: torch.Tensor, ok_BKSN: torch.Tensor, bias_BKSN: torch.Tensor, k_len: int,
    doc_ids_BS: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hkv, Sq, Sk) keep-mask (read blocks, causal, same document) and logit bias per key."""
    B, Hkv, Sq, _ = idx_BKSN.shape
    n_all = -(-k_len // geo.block)
    blocks = torch.zeros(B, Hkv, Sq, n_all + 1, dtype=torch.bool, device=idx_BKSN.device)
    spill = idx_BKSN.masked_fill(~ok_BKSN, n_all)  # invalid slots write into a spare column
    blocks.scatter_(-1, spill, True)
    bias_blocks = torch.zeros(B, Hkv, Sq, n_all + 1, dtype=bias_BKSN.dtype, device=idx_BKSN.device)
    bias_blocks = bias_blocks.scatter(-1, spill, bias_BKSN)
    keep = blocks[..., :n_all].repeat_interleave(geo.block, dim=-1)[..., :k_len]
    bias = bias_blocks[..., :n_all].repeat_interleave(geo.block, dim=-1)[..., :k_len]
    t = torch.arange(k_len - Sq, k_len, device=keep.device)
    keep = keep & (torch.arange(k_len, device=keep.device)[None, :] <= t[:, None])
    if doc_ids_BS is not None:
        keep = keep & (doc_ids_BS[:, None, k_len - Sq :, None] == doc_ids_BS[:, None, None, :])
    return keep, bias


def nosa_attention_naive(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    w_KD: torch.Tensor,
    b_K: torch.Tensor,
    geo: NOSAGeometry,
    scale: float,
    doc_ids_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """NOSA attention with full score matrices (the specification).

    Args:
        q_BHSD: queries (the last Sq of the Sk positions).
        k_BHSD, v_BHSD: (B, Hkv, Sk, D) keys/values.
        w_KD, b_K: importance-score weights (Hkv, D) and biases (Hkv,).
        geo: block budget.
        scale: softmax scale.
        doc_ids_BS: (B, Sk) document ids or None.
    """
    B, H, Sq, D = q_BHSD.shape
    Hkv, Sk = k_BHSD.shape[1], k_BHSD.shape[2]
    kbar = block_summaries(k_BHSD, geo.block)
    score, far_bias = importance_bias(kbar, w_KD, b_K)
    far_idx, far_ok = select_far_blocks(geo, q_BHSD, kbar, score, Sk, doc_ids_BS)
    idx, ok, bias = read_slots(geo, far_idx, far_ok, far_bias, Sq, Sk)
    keep, bias_tok = nosa_token_mask_bias(geo, idx, ok, bias, Sk, doc_ids_BS)
    G = H // Hkv
    s = torch.einsum("bkgtd,bksd->bkgts", q_BHSD.float().view(B, Hkv, G, Sq, D), k_BHSD.float()) * scale
    s = (s + bias_tok[:, :, None]).masked_fill(~keep[:, :, None], float("-inf"))
    p = torch.softmax(s, dim=-1)  # the query's own block is always read: no empty row
    o = torch.einsum("bkgts,bksd->bkgtd", p, v_BHSD.float())
    return o.reshape(B, H, Sq, D).to(q_BHSD.dtype)
