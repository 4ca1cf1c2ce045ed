"""DMA through the block-sparse Triton kernels: the selection becomes per-KV-group block lists (CSR),
the value-derived bias a per-key logit term of the kernel.

The kept (query block, key block) pairs are the only tiles computed; inside a tile the kernel applies
causality and packed-document boundaries per token, exactly as :func:`~longshard.kernels.dma.naive.
dma_attention_naive` masks. The bias gradient comes out of the dK/dV kernel (the sum over the rows
that read a key of dS) and flows on through :func:`~longshard.kernels.dma.select.dma_key_bias` to A,
Delta and the values. Nothing of size Sq x Sk at token level is built; the block lists are
(S / block)^2 booleans per KV head.
"""

from __future__ import annotations

import math

import torch
from longshard.kernels.block_sparse.triton import block_sparse_attention_triton_mask
from longshard.kernels.dma.naive import dma_attention_naive
from longshard.kernels.dma.select import dma_key_bias, select_key_blocks


def dma_block_mask(idx_BKQM: torch.Tensor, ok_BKQM: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """(B, K, Q, N) bool: the key blocks each query block keeps (unused slots dropped)."""
    B, K, Q, _ = idx_BKQM.shape
    mask = torch.zeros(B, K, Q, n_blocks + 1, dtype=torch.bool, device=idx_BKQM.device)
    mask.scatter_(-1, idx_BKQM.masked_fill(~ok_BKQM, n_blocks), True)  # unused slots write a spare column
    return mask[..., :n_blocks]


def dma_attention_triton(
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
    """Same result as :func:`~longshard.kernels.dma.naive.dma_attention_naive` with the Triton kernels.

    Args: as the naive reference; ``block`` must be a Triton tile (16, 32, 64 or 128; the kernel's entry
    checks it). Decoding steps (Sq < Sk) use the naive form.
    """
    B, H, Sq, D = q_BHSD.shape
    K, Sk = k_BKSD.shape[1], k_BKSD.shape[2]
    if Sq != Sk:
        return dma_attention_naive(q_BHSD, k_BKSD, v_BKSD, a_K, delta_KD, block, keep_blocks, scale, doc_ids_BS,
                                   dt_bias_K=dt_bias_K, exp_bias=exp_bias, keep_own=keep_own)
    bias_BKS = dma_key_bias(v_BKSD, a_K, delta_KD, dt_bias_K, exp_bias)
    idx, ok, _ = select_key_blocks(bias_BKS, block, keep_blocks, Sq, Sk, doc_ids_BS, keep_own)
    mask_BHQN = dma_block_mask(idx, ok, math.ceil(Sk / block)).repeat_interleave(H // K, dim=1)
    o, _ = block_sparse_attention_triton_mask(q_BHSD, k_BKSD, v_BKSD, mask_BHQN, block, doc_ids_BS=doc_ids_BS,
                                              scale=scale, bias_BKS=bias_BKS)
    return o
