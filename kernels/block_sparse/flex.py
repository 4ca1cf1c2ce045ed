"""Block-sparse attention through ``torch.nn.attention.flex_attention`` with a per-head BlockMask.

Forward and backward on CUDA (compiled); forward only on CPU (no CPU backward in PyTorch).
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
    pattern = pattern.to(q_BHSD.device)

    def mask_mod(b, h, q_idx, kv_idx):
        keep = token_keep(pattern, q_idx, kv_idx, h)
        if doc_ids_BS is not None:
            keep = keep & (doc_ids_BS[b, q_idx] == doc_ids_BS[b, kv_idx])
        return keep

    bm = create_block_mask(mask_mod, B if doc_ids_BS is not None else None, H, S, S, device=q_BHSD.device)
    return _compiled_flex()(q_BHSD, k_BHSD, v_BHSD, block_mask=bm, scale=scale,
                            enable_gqa=k_BHSD.shape[1] != H)
