"""Reference causal linear attention with per-head exponential decay (quadratic form, fp32).

o_t = sum_{s <= t, same document} exp(-a_h (t - s)) (q_t . k_s) v_s
"""

from __future__ import annotations

import torch


def lightning_attention_naive(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    log_decay_H: torch.Tensor,
    doc_ids_BS: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decayed causal linear attention computed with the full S x S weight matrix.

    Args:
        q_BHSD, k_BHSD: (B, H, S, Dk) feature-mapped queries/keys.
        v_BHSD: (B, H, S, Dv) values.
        log_decay_H: (H,) a_h >= 0; the decay per step is exp(-a_h).
        doc_ids_BS: (B, S) document ids (packed sequences never mix), or None.

    Returns:
        (B, H, S, Dv) in the dtype of ``q_BHSD``.
    """
    S = q_BHSD.shape[2]
    t = torch.arange(S, device=q_BHSD.device)
    dist = (t[:, None] - t[None, :]).float()  # t - s
    w_HSS = torch.exp(-log_decay_H.float()[:, None, None] * dist.clamp_min(0)) * (dist >= 0)
    w = w_HSS[None]
    if doc_ids_BS is not None:
        w = w * (doc_ids_BS[:, None, :, None] == doc_ids_BS[:, None, None, :])
    scores = torch.einsum("bhtd,bhsd->bhts", q_BHSD.float(), k_BHSD.float()) * w
    return torch.einsum("bhts,bhsd->bhtd", scores, v_BHSD.float()).to(q_BHSD.dtype)
