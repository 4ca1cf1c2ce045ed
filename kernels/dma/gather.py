"""DMA attention in memory linear in S: each query block reads only the key blocks it keeps, through
PyTorch's flash attention.

The bias is folded into the attention's dot product: queries get one more coordinate, ``1 / scale``,
keys one more, their bias, so ``q'.k' * scale = q.k * scale + bias`` and the bias (and through it A,
Delta and the values) gets its gradient from the attention's own backward. The query blocks that keep
every earlier block (the first ``keep_blocks`` without packed documents) are one causal call; the others
gather their kept key blocks and run in chunks, each under activation checkpointing when training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from longshard.kernels.attention.fused_cpu import acc_dtype
from longshard.kernels.dma.naive import dma_attention_naive
from longshard.kernels.dma.select import dma_key_bias, select_key_blocks
from torch.utils.checkpoint import checkpoint


def _chunk(qa_BHQTE, ka_BKSE, va_BKSE, idx_BKQM, ok_BKQM, q_start: int, block: int, scale: float, doc_ids_BS):
    """Attention of a run of whole query blocks (T = block positions each) over their kept key blocks; the
    G query heads of a KV head share its gathered keys, so they run as G x T query rows of one call."""
    B, H, Q, T, E = qa_BHQTE.shape
    K, Sk = ka_BKSE.shape[1], ka_BKSE.shape[2]
    G, L = H // K, idx_BKQM.shape[-1] * block
    pos_BKQL = (idx_BKQM[..., None] * block + torch.arange(block, device=qa_BHQTE.device)).flatten(-2)
    tok_ok = ok_BKQM.repeat_interleave(block, dim=-1) & (pos_BKQL < Sk)
    pos_BKQL = pos_BKQL.clamp_max(Sk - 1)
    t_QT = q_start + torch.arange(Q * T, device=qa_BHQTE.device).view(Q, T)  # absolute query positions
    keep = tok_ok[:, :, :, None, :] & (pos_BKQL[:, :, :, None, :] <= t_QT[None, None, :, :, None])  # (B,K,Q,T,L)
    if doc_ids_BS is not None:
        d_key = torch.gather(doc_ids_BS[:, None].expand(B, K, Sk), 2, pos_BKQL.flatten(2)).view_as(pos_BKQL)
        d_q = doc_ids_BS[:, t_QT.clamp_max(Sk - 1)]  # (B, Q, T); padded rows take the last document
        keep = keep & (d_key[:, :, :, None, :] == d_q[:, None, :, :, None])
    gather_idx = pos_BKQL.flatten(2)[..., None].expand(B, K, Q * L, E)
    kg = torch.gather(ka_BKSE, 2, gather_idx).view(B * K * Q, 1, L, E)
    vg = torch.gather(va_BKSE, 2, gather_idx).view(B * K * Q, 1, L, E)
    qg = qa_BHQTE.view(B, K, G, Q, T, E).transpose(2, 3).reshape(B * K * Q, 1, G * T, E)
    mask = keep[:, :, :, None].expand(B, K, Q, G, T, L).reshape(B * K * Q, 1, G * T, L)
    o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)  # every row keeps a key
    return o.view(B, K, Q, G, T, E).transpose(2, 3).reshape(B, H, Q, T, E)


def _augmented(q_BHSD, k_BKSD, v_BKSD, bias_BKS, scale: float):
    """(q', k', v') with the bias as one more coordinate, ``q'.k' * scale = q.k * scale + bias``, zero-padded
    to a multiple of 8 wide (flash attention needs equal widths, and aligned ones run faster: D 128 measured
    20.1 ms plain, 23.7 ms at 129, 21.8 ms at 136 on CPU)."""
    dt = acc_dtype(q_BHSD)
    D = q_BHSD.shape[-1]
    pad = -(-(D + 1) // 8) * 8 - D - 1
    qa = torch.cat([q_BHSD.to(dt), q_BHSD.new_full((*q_BHSD.shape[:-1], 1), 1.0 / scale, dtype=dt)], dim=-1)
    ka = torch.cat([k_BKSD.to(dt), bias_BKS[..., None].to(dt)], dim=-1)
    return F.pad(qa, (0, pad)), F.pad(ka, (0, pad)), F.pad(v_BKSD.to(dt), (0, pad + 1))


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
    *,
    dt_bias_K: torch.Tensor | None = None,
    exp_bias: bool = False,
    keep_own: bool = True,
    q_blocks_per_chunk: int = 4,
) -> torch.Tensor:
    """Same result as :func:`~longshard.kernels.dma.naive.dma_attention_naive` without any (Sq x Sk) tensor.

    Without packed documents the first ``keep_blocks`` query blocks (they keep every earlier block) are one
    causal flash call; the other query blocks run in chunks of ``q_blocks_per_chunk``, each under
    activation checkpointing when training, so the gathered keys/values of one chunk are alive at a
    time: time and memory are S x keep_blocks x block, and the bytes saved for backward per token do not
    grow with S. Decoding steps (Sq < Sk) use the naive form.
    """
    B, H, Sq, D = q_BHSD.shape
    Sk = k_BKSD.shape[2]
    if Sq != Sk:
        return dma_attention_naive(q_BHSD, k_BKSD, v_BKSD, a_K, delta_KD, block, keep_blocks, scale, doc_ids_BS,
                                   dt_bias_K=dt_bias_K, exp_bias=exp_bias, keep_own=keep_own)
    bias_BKS = dma_key_bias(v_BKSD, a_K, delta_KD, dt_bias_K, exp_bias)
    qa, ka, va = _augmented(q_BHSD, k_BKSD, v_BKSD, bias_BKS, scale)
    n = -(-Sq // block)
    first = min(n, keep_blocks) if doc_ids_BS is None else 0  # query blocks that keep every earlier block
    outs = []
    if first:
        P = min(Sq, first * block)
        outs.append(F.scaled_dot_product_attention(qa[:, :, :P], ka[:, :, :P], va[:, :, :P], is_causal=True,
                                                   scale=scale, enable_gqa=True))
    if first < n:
        idx, ok, _ = select_key_blocks(bias_BKS, block, keep_blocks, Sq, Sk, doc_ids_BS, keep_own)
        q_pad = F.pad(qa, (0, 0, 0, n * block - Sq)).view(B, H, n, block, qa.shape[-1])
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (q_BHSD, k_BKSD, v_BKSD, a_K, delta_KD))
        for c0 in range(first, n, q_blocks_per_chunk):
            c1 = min(c0 + q_blocks_per_chunk, n)
            args = (q_pad[:, :, c0:c1], ka, va, idx[:, :, c0:c1], ok[:, :, c0:c1], c0 * block, block, scale,
                    doc_ids_BS)
            o = checkpoint(_chunk, *args, use_reentrant=False) if needs_grad else _chunk(*args)
            outs.append(o.reshape(B, H, (c1 - c0) * block, qa.shape[-1]))
    o = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return o[:, :, :Sq, :D].to(q_BHSD.dtype)
