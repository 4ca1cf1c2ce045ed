"""Band + far block-sparse attention as a few fused SDPA calls over query chunks.

For a chunk of ``chunk_blocks`` query blocks, the keys any of its queries may read are one
contiguous band (the chunk plus the ``band_blocks - 1`` blocks before it) and, per head, the far
blocks that lie before that band (all of which every query of the chunk may read). Each chunk is
one ``scaled_dot_product_attention`` call over [far keys, band keys] with a boolean mask for the
rest of the rule (local distance, far blocks inside the band, token windows/sinks, causality,
documents). SDPA's fused CPU/GPU kernels then do the work: the cost is (far + band + chunk) keys
per query instead of every earlier key, with no S x S score matrix, and autograd differentiates
it like dense attention. Exact (the same set of keys per query as :mod:`banded`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from longshard.kernels.block_sparse.banded import BandFarSpec


def band_far_attention_chunked(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    spec: BandFarSpec,
    doc_ids_BS: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_blocks: int = 8,
) -> torch.Tensor:
    """Band + far block-sparse causal attention (Sq == Sk) through SDPA, ``chunk_blocks`` query blocks per call.

    Args: as :func:`longshard.kernels.block_sparse.banded.band_far_attention`, plus
        chunk_blocks: query blocks per SDPA call (more = fewer calls, more masked band keys).
    """
    B, H, S, D = q_BHSD.shape
    Hkv = k_BHSD.shape[1]
    G, blk, L = H // Hkv, spec.block, spec.band_blocks
    n = math.ceil(S / blk)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dev = q_BHSD.device
    kv_head = torch.arange(H, device=dev) // G
    far = spec.far_HF.to(dev) if spec.far_HF is not None and spec.far_HF.shape[1] else None
    window = spec.window_H.to(dev)[:, None, None] if spec.window_H is not None else None
    sink = spec.sink_H.to(dev)[:, None, None] if spec.sink_H is not None else None
    limit = spec.far_token_limit_H.to(dev)[:, None, None] if spec.far_token_limit_H is not None else None
    if far is not None:
        far_set = torch.zeros(H, n + 1, dtype=torch.bool, device=dev)  # column n absorbs the -1 padding
        far_set.scatter_(1, torch.where((far >= 0) & (far < n), far, n), True)
        far_set = far_set[:, :n]
    outs = []
    for c0 in range(0, n, chunk_blocks):
        c1 = min(c0 + chunk_blocks, n)
        q_start, q_end = c0 * blk, min(c1 * blk, S)
        b0 = max(c0 - L + 1, 0)
        k_start = b0 * blk
        q_pos = torch.arange(q_start, q_end, device=dev)  # (Cq,)
        band_pos = torch.arange(k_start, q_end, device=dev)  # (Lb,)
        qi, kj = q_pos // blk, band_pos // blk
        # band keys: causal and either near (within L blocks; token window/sinks apply) or a far block
        # of the head at distance >= L (far token limit applies)
        causal = (band_pos[None, :] <= q_pos[:, None])[None]  # (1, Cq, Lb)
        near = (qi[:, None] - kj[None, :] < L)[None]
        near_keep = near
        if window is not None:
            w_ok = (window <= 0) | ((q_pos[:, None] - band_pos[None, :])[None] < window)
            if sink is not None:
                w_ok = w_ok | (band_pos[None, None, :] < sink)
            near_keep = near & w_ok
        keep_band = near_keep
        if far is not None:
            far_keep = ~near & far_set[:, kj][:, None, :]
            if limit is not None:
                far_keep = far_keep & ((limit <= 0) | (band_pos[None, None, :] < limit))
            keep_band = keep_band | far_keep
        keep_band = keep_band & causal
        k_band = k_BHSD[:, :, k_start:q_end]
        v_band = v_BHSD[:, :, k_start:q_end]
        keys_k, keys_v, masks, pos_parts = [], [], [], []
        if far is not None:
            before = (far >= 0) & (far < b0)  # (H, F): far blocks left of the band
            n_far = int(before.sum(1).max()) if before.any() else 0
            if n_far:
                order = torch.where(before, torch.arange(far.shape[1], device=dev), far.shape[1] + 1).argsort(1)
                fb = torch.gather(far, 1, order[:, :n_far])  # (H, n_far) block ids, valid first
                f_ok = torch.gather(before, 1, order[:, :n_far])
                fpos = (fb.clamp_min(0)[..., None] * blk + torch.arange(blk, device=dev)).reshape(H, n_far * blk)
                f_keep = f_ok.repeat_interleave(blk, dim=1) & (fpos < S)
                if limit is not None:
                    f_keep = f_keep & ((limit[:, 0] <= 0) | (fpos < limit[:, 0]))
                kk = k_BHSD[:, kv_head[:, None], fpos.clamp_max(S - 1)]  # (B, H, n_far*blk, D)
                vv = v_BHSD[:, kv_head[:, None], fpos.clamp_max(S - 1)]
                keys_k.append(kk)
                keys_v.append(vv)
                masks.append(f_keep[:, None, :].expand(H, q_end - q_start, -1))
                pos_parts.append(fpos.clamp_max(S - 1))
        keys_k.append(k_band.repeat_interleave(G, dim=1) if keys_k else k_band)
        keys_v.append(v_band.repeat_interleave(G, dim=1) if keys_v else v_band)
        masks.append(keep_band.expand(H, -1, -1))
        pos_parts.append(band_pos[None].expand(H, -1))
        if len(keys_k) == 1:  # band only: the keys are a slice of k (no copy)
            kc, vc, mask = keys_k[0], keys_v[0], masks[0][None]
        else:
            kc, vc = torch.cat(keys_k, dim=2), torch.cat(keys_v, dim=2)
            mask = torch.cat(masks, dim=2)[None]  # (1, H, Cq, Lk)
        if doc_ids_BS is not None:
            kpos = torch.cat(pos_parts, dim=1)  # (H, Lk)
            d_q = doc_ids_BS[:, q_start:q_end]
            d_k = doc_ids_BS[:, kpos]  # (B, H, Lk)
            mask = mask & (d_q[:, None, :, None] == d_k[:, :, None, :])
        gqa = kc.shape[1] != H
        o = F.scaled_dot_product_attention(q_BHSD[:, :, q_start:q_end], kc, vc, attn_mask=mask, scale=scale,
                                           enable_gqa=gqa)
        outs.append(o)
    return torch.cat(outs, dim=2)
