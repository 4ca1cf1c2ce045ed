"""Reference block-sparse attention: the full score matrix with the pattern's mask (fp32)."""

from __future__ import annotations

import torch
from longshard.kernels.attention.naive import attention_naive
from longshard.kernels.block_sparse.pattern import SparsePattern, dense_mask


def block_sparse_attention_naive(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    pattern: SparsePattern,
    doc_ids_BS: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention restricted to ``pattern`` (queries aligned to the end of the keys).

    Args:
        q_BHSD: (B, H, Sq, D) queries.
        k_BHSD, v_BHSD: (B, Hkv, Sk, D) keys/values, H a multiple of Hkv.
        pattern: per-head sparsity over ceil(Sk / block) blocks.
        doc_ids_BS: (B, Sk) document ids of packed sequences, or None.
        scale: softmax scale (default 1/sqrt(D)).
    """
    mask = dense_mask(pattern, q_BHSD.shape[2], k_BHSD.shape[2], doc_ids_BS, q_BHSD.device)
    return attention_naive(q_BHSD, k_BHSD, v_BHSD, mask, scale)
