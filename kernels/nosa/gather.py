"""NOSA attention in memory linear in S: each query gathers only the blocks it reads."""

from __future__ import annotations

import torch
from longshard.kernels.nosa.naive import nosa_attention_naive
from longshard.kernels.nosa.select import (
    NOSAGeometry,
    block_summaries,
    importance_bias,
    read_slots,
    select_far_blocks,
)
from longshard.kernels.nsa.gather import _selected_gather


def nosa_attention_gather(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    w_KD: torch.Tensor,
    b_K: torch.Tensor,
    geo: NOSAGeometry,
    scale: float,
    doc_ids_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same result as :func:`longshard.kernels.nosa.naive.nosa_attention_naive`.

    Each query reads ``geo.n_slots`` blocks (sinks, local, far), gathered in checkpointed query
    chunks (the NSA selected-branch helper, with the importance bias added per block), so time and
    memory are S x n_slots x block instead of S x S. Decoding steps (Sq < Sk) use the naive form.
    """
    Sq, Sk = q_BHSD.shape[2], k_BHSD.shape[2]
    if Sq != Sk:
        return nosa_attention_naive(q_BHSD, k_BHSD, v_BHSD, w_KD, b_K, geo, scale, doc_ids_BS)
    kbar = block_summaries(k_BHSD, geo.block)
    score, far_bias = importance_bias(kbar, w_KD, b_K)
    far_idx, far_ok = select_far_blocks(geo, q_BHSD, kbar, score, Sk, doc_ids_BS)
    idx, ok, bias = read_slots(geo, far_idx, far_ok, far_bias, Sq, Sk)
    return _selected_gather(q_BHSD, k_BHSD, v_BHSD, idx, ok, geo, scale, doc_ids_BS, bias_BKSN=bias)
