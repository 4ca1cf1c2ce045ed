"""Block-sparse attention as a band of recent blocks plus a fixed per-head set of far blocks.

S2 (local blocks + strided blocks + sinks), streaming heads (window + sinks) and sliding windows
all have this shape. The band is computed as ``band_blocks`` shifted block-diagonal matmuls over
contiguous slices of K/V (no copies of K/V per query block, unlike a gather), the far blocks with
one small gather per head; a single softmax runs over both. Exact, trainable by autograd, memory
and time proportional to (band + far) x S.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from longshard.kernels.block_sparse.pattern import BandFarSpec

__all__ = ["BandFarSpec", "band_far_attention", "require_no_full_heads"]


def require_no_full_heads(spec: BandFarSpec) -> None:
    """The band kernels run band + far heads only: heads with full attention go to a dense kernel."""
    if spec.has_full_heads():
        raise ValueError("the spec has full-attention heads (full_H): run them densely and pass the band "
                         "kernels spec.select_heads(~spec.full_H) (as BlockSparseAttention.banded_forward does)")


def band_far_attention(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    spec: BandFarSpec,
    doc_ids_BS: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Band + far block-sparse causal attention (Sq == Sk)."""
    require_no_full_heads(spec)
    B, H, S, D = q_BHSD.shape
    Hkv = k_BHSD.shape[1]
    G, blk, L = H // Hkv, spec.block, spec.band_blocks
    n = math.ceil(S / blk)
    pad = n * blk - S
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dev = q_BHSD.device
    neg = torch.finfo(torch.float32).min

    q = F.pad(q_BHSD, (0, 0, 0, pad)).view(B, Hkv, G, n, blk, D) * scale
    kp = F.pad(k_BHSD, (0, 0, (L - 1) * blk, pad)).view(B, Hkv, n + L - 1, blk, D)
    vp = F.pad(v_BHSD, (0, 0, (L - 1) * blk, pad)).view(B, Hkv, n + L - 1, blk, D)

    # band scores: offset o pairs query block i with key block i - (L-1) + o
    k_shift = kp.unfold(2, n, 1).permute(0, 1, 2, 5, 3, 4).unbind(dim=2)  # L shifted (B, Hkv, n, blk, D) views
    s_band = torch.stack([torch.einsum("bkgnid,bknjd->bkgnij", q, k_o) for k_o in k_shift], dim=-2)
    s_band = s_band.reshape(B, H, n, blk, L * blk)
    qpos = torch.arange(n * blk, device=dev).view(n, blk)
    kpos = (torch.arange(n, device=dev)[:, None] - (L - 1)) * blk + torch.arange(L * blk, device=dev)  # (n, L*blk)
    keep_band = (kpos[:, None, :] >= 0) & (kpos[:, None, :] <= qpos[:, :, None])  # (n, blk, L*blk)
    keep_band = keep_band[None, None]
    if spec.window_H is not None:
        w = spec.window_H.to(dev)[:, None, None, None]
        sk = (spec.sink_H.to(dev) if spec.sink_H is not None else torch.zeros_like(spec.window_H))[:, None, None, None]
        dist = qpos[:, :, None] - kpos[:, None, :]
        keep_band = keep_band & ((w <= 0) | (dist < w) | (kpos[:, None, :] < sk))[None]
    if doc_ids_BS is not None:
        docp = F.pad(doc_ids_BS, (0, pad), value=-1)
        doc_k = F.pad(docp, ((L - 1) * blk, 0), value=-2).unfold(1, L * blk, blk)  # (B, n, L*blk)
        keep_band = keep_band & (docp.view(B, n, blk)[:, :, :, None] == doc_k[:, :, None, :])[:, None]
    scores = [s_band.float().masked_fill(~keep_band, neg)]

    far = spec.far_HF
    if far is not None and far.shape[1] > 0:
        far = far.to(dev)
        far = torch.where(far < n, far, -1)  # blocks past the sequence do not exist
        Fn = far.shape[1]
        kv_head = torch.arange(H, device=dev) // G
        kb = kp[:, :, L - 1 :]  # (B, Hkv, n, blk, D), unpadded blocks
        vb = vp[:, :, L - 1 :]
        fidx = far.clamp_min(0)
        k_far = kb[:, kv_head[:, None], fidx]  # (B, H, F, blk, D)
        v_far = vb[:, kv_head[:, None], fidx]
        s_far = torch.einsum("bhnid,bhfjd->bhnifj", q.reshape(B, H, n, blk, D), k_far).reshape(B, H, n, blk, Fn * blk)
        blk_i = torch.arange(n, device=dev)
        ok_blk = (far[:, None, :] >= 0) & (far[:, None, :] <= blk_i[None, :, None] - L)  # (H, n, F)
        fpos = (fidx[..., None] * blk + torch.arange(blk, device=dev)).reshape(H, Fn * blk)  # (H, F*blk)
        keep_far = ok_blk.repeat_interleave(blk, dim=-1)[:, :, None, :] & (fpos < S)[:, None, None, :]
        if spec.far_token_limit_H is not None:
            lim = spec.far_token_limit_H.to(dev)[:, None]
            keep_far = keep_far & ((lim <= 0) | (fpos < lim))[:, None, None, :]
        keep_far = keep_far[None]
        if doc_ids_BS is not None:
            doc_far = docp[:, fpos.clamp_max(n * blk - 1)]  # (B, H, F*blk)
            keep_far = keep_far & (docp.view(B, 1, n, blk, 1) == doc_far[:, :, None, None, :])
        scores.append(s_far.float().masked_fill(~keep_far, neg))

    p = torch.softmax(torch.cat(scores, dim=-1), dim=-1).to(v_BHSD.dtype)
    p_parts = p.split([L * blk, p.shape[-1] - L * blk], dim=-1)  # split/unbind: one cheap backward each
    p_band = p_parts[0].reshape(B, Hkv, G, n, blk, L, blk).unbind(dim=-2)
    v_shift = vp.unfold(2, n, 1).permute(0, 1, 2, 5, 3, 4).unbind(dim=2)  # L views (B, Hkv, n, blk, D)
    o = sum(torch.einsum("bkgnij,bknjd->bkgnid", p_o, v_o) for p_o, v_o in zip(p_band, v_shift))
    o = o.reshape(B, H, n, blk, D)
    if len(scores) > 1:
        p_far = p_parts[1].reshape(B, H, n, blk, Fn, blk)
        o = o + torch.einsum("bhnifj,bhfjd->bhnid", p_far, v_far)
    return o.reshape(B, H, n * blk, D)[:, :, :S]
