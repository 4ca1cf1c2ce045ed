"""DMA attention in memory linear in S: each query block gathers only the key blocks it keeps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from longshard.kernels.dma.naive import dma_attention_naive
from longshard.kernels.dma.select import acc_dtype, dma_key_bias, select_key_blocks
from torch.utils.checkpoint import checkpoint


def _chunk(q_BHQTD, k_BKSD, v_BKSD, bias_BKS, idx_BKQM, ok_BKQM, q_start: int, block: int, scale: float,
           doc_ids_BS):
    """Attention of a run of whole query blocks (T = block positions each) over their kept key blocks."""
    B, H, Q, T, D = q_BHQTD.shape
    K, Sk = k_BKSD.shape[1], k_BKSD.shape[2]
    M = idx_BKQM.shape[-1]
    dt = acc_dtype(q_BHQTD)
    pos_BKQL = (idx_BKQM[..., None] * block + torch.arange(block, device=q_BHQTD.device)).flatten(-2)  # L = M*block
    tok_ok = ok_BKQM.repeat_interleave(block, dim=-1) & (pos_BKQL < Sk)
    pos_BKQL = pos_BKQL.clamp_max(Sk - 1)
    t_QT = q_start + torch.arange(Q * T, device=q_BHQTD.device).view(Q, T)  # absolute query positions
    keep = tok_ok[:, :, :, None, :] & (pos_BKQL[:, :, :, None, :] <= t_QT[None, None, :, :, None])  # (B,K,Q,T,L)
    if doc_ids_BS is not None:
        flat_pos = pos_BKQL.flatten(2)
        d_key = torch.gather(doc_ids_BS[:, None].expand(B, K, Sk), 2, flat_pos).view_as(pos_BKQL)
        d_q = doc_ids_BS[:, t_QT.clamp_max(Sk - 1)]  # (B, Q, T); padded rows take the last document
        keep = keep & (d_key[:, :, :, None, :] == d_q[:, None, :, :, None])
    gather_idx = pos_BKQL.flatten(2)[..., None].expand(B, K, Q * M * block, D)
    kg = torch.gather(k_BKSD, 2, gather_idx).view(B, K, Q, M * block, D).to(dt)
    vg = torch.gather(v_BKSD, 2, gather_idx).view(B, K, Q, M * block, D).to(dt)
    bg = torch.gather(bias_BKS, 2, pos_BKQL.flatten(2)).view(B, K, Q, M * block)
    qg = q_BHQTD.to(dt).view(B, K, H // K, Q, T, D)
    s = torch.einsum("bkgqtd,bkqld->bkgqtl", qg, kg) * scale + bg[:, :, None, :, None, :]
    s = s.masked_fill(~keep[:, :, None], float("-inf"))
    p = torch.softmax(s, dim=-1)  # every row keeps its own position (padded rows: the last key)
    return torch.einsum("bkgqtl,bkqld->bkgqtd", p, vg).reshape(B, H, Q, T, D)


def dma_attention_gather(
    q_BHSD: torch.Tensor,
    k_BKSD: torch.Tensor,
    v_BKSD: torch.Tensor,
    a_K: torch.Tensor,
    delta_KD: torch.Tensor,
    block: int,
    keep_blocks: int,
    scale: float,
    doc_ids_BS: torch.Tensor | None = None,
    q_blocks_per_chunk: int = 4,
) -> torch.Tensor:
    """Same result as :func:`~longshard.kernels.dma.naive.dma_attention_naive` without any (Sq x Sk) tensor.

    Query blocks are processed in runs of ``q_blocks_per_chunk``, each under activation checkpointing
    when training, so the gathered keys/values of one run are alive at a time: time and memory are
    S x keep_blocks x block, and the bytes saved for backward per token do not grow with S. Decoding
    steps (Sq < Sk) use the naive form.
    """
    B, H, Sq, D = q_BHSD.shape
    Sk = k_BKSD.shape[2]
    if Sq != Sk:
        return dma_attention_naive(q_BHSD, k_BKSD, v_BKSD, a_K, delta_KD, block, keep_blocks, scale, doc_ids_BS)
    bias_BKS = dma_key_bias(v_BKSD, a_K, delta_KD)
    idx, ok, _ = select_key_blocks(bias_BKS, block, keep_blocks, Sq, Sk, doc_ids_BS)
    n = idx.shape[2]
    q_pad = F.pad(q_BHSD, (0, 0, 0, n * block - Sq)).view(B, H, n, block, D)
    outs = []
    needs_grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (q_BHSD, k_BKSD, v_BKSD, a_K, delta_KD))
    for c0 in range(0, n, q_blocks_per_chunk):
        c1 = min(c0 + q_blocks_per_chunk, n)
        args = (q_pad[:, :, c0:c1], k_BKSD, v_BKSD, bias_BKS, idx[:, :, c0:c1], ok[:, :, c0:c1], c0 * block, block,
                scale, doc_ids_BS)
        outs.append(checkpoint(_chunk, *args, use_reentrant=False) if needs_grad else _chunk(*args))
    o = torch.cat(outs, dim=2).reshape(B, H, n * block, D)[:, :, :Sq]
    return o.to(q_BHSD.dtype)
