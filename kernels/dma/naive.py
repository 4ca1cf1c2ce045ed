"""Reference DMA attention: the explicit (B, H, Sq, Sk) keep-mask and bias, plain softmax (the specification)."""

from __future__ import annotations

import torch
from longshard.kernels.attention.fused_cpu import acc_dtype
from longshard.kernels.dma.select import dma_key_bias, select_key_blocks


def dma_token_mask(idx_BKQM: torch.Tensor, ok_BKQM: torch.Tensor, q0: int, block: int, q_len: int, k_len: int,
                   doc_ids_BS: torch.Tensor | None) -> torch.Tensor:
    """(B, K, Sq, Sk) keep-mask: the query's block reads the key, the key is not later, same document."""
    B, K, Q, _ = idx_BKQM.shape
    n = -(-k_len // block)
    blocks_BKQN = torch.zeros(B, K, Q, n + 1, dtype=torch.bool, device=idx_BKQM.device)
    blocks_BKQN.scatter_(-1, idx_BKQM.masked_fill(~ok_BKQM, n), True)  # unused slots write a spare column
    t = torch.arange(k_len - q_len, k_len, device=idx_BKQM.device)
    rows = blocks_BKQN[:, :, t // block - q0, :n]  # (B, K, Sq, N)
    keep = rows.repeat_interleave(block, dim=-1)[..., :k_len]
    keep = keep & (torch.arange(k_len, device=keep.device)[None, :] <= t[:, None])
    if doc_ids_BS is not None:
        keep = keep & (doc_ids_BS[:, None, k_len - q_len :, None] == doc_ids_BS[:, None, None, :])
    return keep


def dma_attention_naive(
    q_BHSD: torch.Tensor,
    k_BKSD: torch.Tensor,
    v_BKSD: torch.Tensor,
    a_K: torch.Tensor,
    delta_KD: torch.Tensor,
    block: int,
    keep_blocks: int,
    scale: float,
    doc_ids_BS: torch.Tensor | None = None,
    *,
    dt_bias_K: torch.Tensor | None = None,
    exp_bias: bool = False,
    keep_own: bool = True,
) -> torch.Tensor:
    """DMA with full score matrices.

    ``out_t = sum_j softmax_j(q_t . k_j * scale + bias_j) v_j`` over the keys j of the blocks t's query
    block keeps (:func:`~longshard.kernels.dma.select.select_key_blocks`), causal and within t's document.

    Args:
        q_BHSD: queries, the last Sq of the Sk positions.
        k_BKSD, v_BKSD: keys and values (B, K, Sk, D).
        a_K, delta_KD: the bias parameters A (K,) and Delta (K, D), or the reference's full ``dt_proj``
            weight (K, K*D) (:func:`~longshard.kernels.dma.select.dma_key_bias`).
        block: tokens per block.
        keep_blocks: key blocks each query block reads, its own included.
        scale: softmax scale.
        doc_ids_BS: (B, Sk) document ids, or None.
        dt_bias_K: the full ``dt_proj``'s bias (K,), or None.
        exp_bias: the reference's ``exp(A softplus(dt))`` instead of ``A softplus(dt)``.
        keep_own: longshard's rule (own block kept, the earlier ones ranked), or False at ``block`` 1: the
            reference's top-w keys per query (:func:`~longshard.kernels.dma.select.select_key_blocks`).
    """
    B, H, Sq, D = q_BHSD.shape
    K, Sk = k_BKSD.shape[1], k_BKSD.shape[2]
    dt = acc_dtype(q_BHSD)
    bias_BKS = dma_key_bias(v_BKSD, a_K, delta_KD, dt_bias_K, exp_bias)
    idx, ok, q0 = select_key_blocks(bias_BKS, block, keep_blocks, Sq, Sk, doc_ids_BS, keep_own)
    keep_BKSS = dma_token_mask(idx, ok, q0, block, Sq, Sk, doc_ids_BS)
    s = torch.einsum("bkgtd,bksd->bkgts", q_BHSD.to(dt).view(B, K, H // K, Sq, D), k_BKSD.to(dt)) * scale
    s = (s + bias_BKS[:, :, None, None, :].to(dt)).masked_fill(~keep_BKSS[:, :, None], float("-inf"))
    p = torch.softmax(s, dim=-1)  # every query keeps at least one key (its own is always a candidate)
    o = torch.einsum("bkgts,bksd->bkgtd", p, v_BKSD.to(dt))
    return o.reshape(B, H, Sq, D).to(q_BHSD.dtype)
