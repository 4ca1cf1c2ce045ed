"""Block-sparse attention through ``torch.nn.attention.flex_attention`` with a per-head BlockMask.

Forward and backward on CUDA (compiled); forward only on CPU (no CPU backward in PyTorch). The
BlockMask of a pattern without packed documents is built once per sequence length and kept in
the pattern's cache (``create_block_mask`` evaluates the mask over all H x S^2 positions).
"""

from __future__ import annotations

import functools

import torch
from longshard.kernels.block_sparse.pattern import SparsePattern, token_keep


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_available() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - old torch
        return False
    return True


def block_sparse_attention_flex(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    pattern: SparsePattern,
    doc_ids_BS: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Block-sparse attention with flex_attention (Sq == Sk; the BlockMask skips dropped blocks)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, H, S, D = q_BHSD.shape
    cache = pattern.cache  # the caller's pattern (``to`` returns a copy with an empty cache)
    pattern = pattern.to(q_BHSD.device)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = token_keep(pattern, q_idx, kv_idx, h)
        if doc_ids_BS is not None:
            keep = keep & (doc_ids_BS[b, q_idx] == doc_ids_BS[b, kv_idx])
        return keep

    if doc_ids_BS is None:  # the mask depends on the pattern and S only: build it once per layer and length
        key = ("flex_block_mask", S, str(q_BHSD.device))
        if key not in cache:
            cache[key] = create_block_mask(mask_mod, None, H, S, S, device=q_BHSD.device)
        bm = cache[key]
    else:  # packed documents change every batch: a fresh mask (keyed by content it could go stale)
        bm = create_block_mask(mask_mod, B, H, S, S, device=q_BHSD.device)
    return _compiled_flex()(q_BHSD, k_BHSD, v_BHSD, block_mask=bm, scale=scale,
                            enable_gqa=k_BHSD.shape[1] != H)
