"""Plain PyTorch softmax attention: the specification every faster path is tested against."""

from __future__ import annotations

import math

import torch


def causal_doc_mask(
    q_len: int,
    k_len: int,
    doc_ids_BS: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Boolean keep-mask for causal attention, optionally restricted to same-document pairs.

    Queries are the last ``q_len`` positions of the ``k_len`` keys (decode-friendly alignment).

    Args:
        q_len: number of query positions.
        k_len: number of key positions (>= q_len).
        doc_ids_BS: (B, k_len) document id per key position, or None for one document.
        device: device of the mask when ``doc_ids_BS`` is None.

    Returns:
        (1 or B, 1, q_len, k_len) bool, True where attention is allowed.
    """
    if doc_ids_BS is not None:
        device = doc_ids_BS.device
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    mask_QN = q_pos[:, None] >= k_pos[None, :]
    if doc_ids_BS is None:
        return mask_QN[None, None]
    same_BQN = doc_ids_BS[:, k_len - q_len :, None] == doc_ids_BS[:, None, :]
    return (same_BQN & mask_QN[None])[:, None]


def attention_naive(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    mask_BHQN: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention computed in fp32 with an explicit score matrix.

    Args:
        q_BHSD: queries (B, H, Sq, D).
        k_BHSD: keys (B, Hkv, Sk, D); H must be a multiple of Hkv (GQA/MQA).
        v_BHSD: values (B, Hkv, Sk, Dv).
        mask_BHQN: bool keep-mask broadcastable to (B, H, Sq, Sk); None = full attention.
        scale: softmax scale, default 1/sqrt(D).
        return_lse: also return the log-sum-exp of the scaled scores (B, H, Sq), fp32.

    Returns:
        Output (B, H, Sq, Dv) in the dtype of ``q_BHSD`` (and the LSE if asked).
        Rows whose mask is all False produce zeros (LSE = -inf).
    """
    n_heads, n_kv = q_BHSD.shape[1], k_BHSD.shape[1]
    if n_heads % n_kv != 0:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of key/value heads ({n_kv})")
    rep = n_heads // n_kv
    k = k_BHSD.float().repeat_interleave(rep, dim=1)
    v = v_BHSD.float().repeat_interleave(rep, dim=1)
    scale = 1.0 / math.sqrt(q_BHSD.shape[-1]) if scale is None else scale
    with torch.autocast(q_BHSD.device.type, enabled=False):  # the specification stays fp32 under autocast
        s_BHQN = torch.einsum("bhqd,bhkd->bhqk", q_BHSD.float(), k) * scale
        if mask_BHQN is not None:
            s_BHQN = s_BHQN.masked_fill(~mask_BHQN, float("-inf"))
        lse_BHQ = torch.logsumexp(s_BHQN, dim=-1)
        safe_lse = torch.where(torch.isfinite(lse_BHQ), lse_BHQ, torch.zeros_like(lse_BHQ))
        p_BHQN = torch.exp(s_BHQN - safe_lse[..., None])
        o_BHQD = torch.einsum("bhqk,bhkd->bhqd", p_BHQN, v).to(q_BHSD.dtype)
    return (o_BHQD, lse_BHQ) if return_lse else o_BHQD


def attention_gathered(q_BH1D: torch.Tensor, k_BKLD: torch.Tensor, v_BKLD: torch.Tensor, keep_BHL: torch.Tensor,
                       bias_BKL: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Softmax attention of one query per head over gathered keys, fp32 like the naive paths.

    Args:
        q_BH1D: (B, H, 1, D) queries.
        k_BKLD, v_BKLD: (B, Hkv, L, D) gathered keys/values.
        keep_BHL: (B, H or Hkv, L) bool keep-mask (Hkv = shared by the group).
        bias_BKL: (B, Hkv, L) additive logit bias or None.
        scale: softmax scale.
    """
    B, H, _, D = q_BH1D.shape
    Hkv, L = k_BKLD.shape[1], k_BKLD.shape[2]
    G = H // Hkv
    s = torch.einsum("bkgd,bkld->bkgl", q_BH1D.float().view(B, Hkv, G, D), k_BKLD.float()) * scale
    if bias_BKL is not None:
        s = s + bias_BKL.float()[:, :, None]
    keep = keep_BHL.view(B, Hkv, -1, L)
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    o = torch.einsum("bkgl,bkld->bkgd", p, v_BKLD.float())
    return o.reshape(B, H, 1, D).to(q_BH1D.dtype)
