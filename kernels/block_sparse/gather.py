"""CPU-trainable block-sparse attention: gather only the kept K/V blocks per query block.

Exact softmax over the gathered keys, differentiated by autograd, so time and memory scale with
the number of kept blocks instead of the full S x S square.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from longshard.kernels.block_sparse.pattern import SparsePattern, kept_first, token_keep


def kept_block_index(block_mask_HQN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded per-(head, query-block) list of kept key blocks.

    Returns:
        ``idx_HQM`` (H, nQ, M) long key-block indices (kept ones first, ascending) and
        ``valid_HQM`` (H, nQ, M) bool, with M the largest kept count.
    """
    counts = block_mask_HQN.sum(-1)
    m = max(int(counts.max()), 1)
    idx = kept_first(block_mask_HQN, m)
    valid = torch.arange(m, device=idx.device) < counts[..., None]
    return idx, valid


def block_sparse_attention_gather(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    pattern: SparsePattern,
    doc_ids_BS: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention for training/prefill (Sq == Sk).

    Args: as :func:`longshard.kernels.block_sparse.naive.block_sparse_attention_naive`.
    """
    B, H, S, D = q_BHSD.shape
    Hkv = k_BHSD.shape[1]
    if k_BHSD.shape[2] != S:
        raise ValueError("the gather path needs as many queries as keys (training / prefill)")
    blk = pattern.block
    n = math.ceil(S / blk)
    pad = n * blk - S
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q = F.pad(q_BHSD, (0, 0, 0, pad)).view(B, H, n, blk, D)
    k = F.pad(k_BHSD, (0, 0, 0, pad)).view(B, Hkv, n, blk, D)
    v = F.pad(v_BHSD, (0, 0, 0, pad)).view(B, Hkv, n, blk, D)
    bm = pattern.block_mask_HQN[:, :n, :n]
    idx, valid = kept_block_index(bm)  # (H, n, M)
    M = idx.shape[-1]
    kv_head = torch.arange(H, device=q.device) // (H // Hkv)
    kg = k[:, kv_head[:, None, None], idx]  # (B, H, n, M, blk, D)
    vg = v[:, kv_head[:, None, None], idx]
    s = torch.einsum("bhnid,bhnmjd->bhnimj", q, kg).reshape(B, H, n, blk, M * blk) * scale

    heads = torch.arange(H, device=q.device)
    q_pos = (torch.arange(n, device=q.device)[:, None] * blk + torch.arange(blk, device=q.device))  # (n, blk)
    k_pos = (idx[..., None] * blk + torch.arange(blk, device=q.device)).reshape(H, n, M * blk)
    k_ok = (valid[..., None].expand(H, n, M, blk).reshape(H, n, M * blk)) & (k_pos < S)
    keep = token_keep(pattern, q_pos[None, :, :, None], k_pos[:, :, None, :], heads[:, None, None, None])
    keep = (keep & k_ok[:, :, None, :])[None]  # (1, H, n, blk, M*blk)
    if doc_ids_BS is not None:
        doc = F.pad(doc_ids_BS, (0, pad), value=-1)
        dq = doc.view(B, n, blk)[:, None, :, :, None]
        dk = doc[:, k_pos.clamp_max(n * blk - 1)][:, :, :, None, :]  # (B, H, n, 1, M*blk)
        keep = keep & (dq == dk)
    s = s.masked_fill(~keep, torch.finfo(s.dtype).min)  # padded query rows stay finite
    p = torch.softmax(s.float(), dim=-1).to(v.dtype).view(B, H, n, blk, M, blk)
    o = torch.einsum("bhnimj,bhnmjd->bhnid", p, vg).reshape(B, H, n * blk, D)
    return o[:, :, :S]
