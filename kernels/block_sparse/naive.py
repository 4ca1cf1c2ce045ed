"""Reference block-sparse attention: the full score matrix with the pattern's mask (fp32), and the
token-level rule of a band + far spec."""

from __future__ import annotations

import torch
from longshard.kernels.attention.naive import attention_naive
from longshard.kernels.block_sparse.pattern import BandFarSpec, SparsePattern, dense_mask


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


def band_far_keep_naive(spec: BandFarSpec, seq_len: int) -> torch.Tensor:
    """(H, S, S) bool: the keys each query of each head reads under ``spec``, head by head straight
    from :class:`BandFarSpec`'s rule (no documents) — the reference its derived forms are held to."""
    q = torch.arange(seq_len)[:, None]
    k = torch.arange(seq_len)[None, :]
    i, j, L = q // spec.block, k // spec.block, spec.band_blocks
    value = lambda t, h: 0 if t is None else int(t[h])
    heads = []
    for h in range(spec.n_heads):
        if spec.full_H is not None and bool(spec.full_H[h]):
            heads.append(k <= q)
            continue
        band = i - j < L
        if value(spec.window_H, h) > 0:
            band = band & ((q - k < value(spec.window_H, h)) | (k < value(spec.sink_H, h)))
        far_ids = spec.far_HF[h][spec.far_HF[h] >= 0] if spec.far_HF is not None else torch.empty(0, dtype=torch.long)
        far = torch.isin(j, far_ids) & (j <= i - L)
        if value(spec.far_token_limit_H, h) > 0:
            far = far & (k < value(spec.far_token_limit_H, h))
        heads.append((k <= q) & (band | far))
    return torch.stack(heads)
