"""NSA branches in memory linear in S: per-query gathered selected blocks, block-sparse sliding window."""

from __future__ import annotations

import torch
from longshard.kernels.block_sparse import block_sparse_attention_gather
from longshard.kernels.block_sparse.pattern import sink_window_pattern
from longshard.kernels.nsa.naive import nsa_branches_naive
from longshard.kernels.nsa.select import (
    NSAGeometry,
    compressed_attention,
    compressed_valid,
    query_positions,
    select_blocks,
)


def _selected_gather(q, k, v, idx, ok, geo: NSAGeometry, scale: float, doc_ids_BS) -> torch.Tensor:
    """Each query attends to the tokens of its own n selected blocks (gathered, not masked)."""
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G, ls, n = H // Hkv, geo.select_block, idx.shape[-1]
    pos = (idx[..., None] * ls + torch.arange(ls, device=q.device)).reshape(B, Hkv, Sq, n * ls)
    tok_ok = ok.repeat_interleave(ls, dim=-1) & (pos < Sk)
    t = query_positions(Sq, Sk, q.device)
    tok_ok = tok_ok & (pos <= t[None, None, :, None])
    pos = pos.clamp_max(Sk - 1)
    if doc_ids_BS is not None:
        d_key = torch.gather(doc_ids_BS[:, None].expand(B, Hkv, Sk), 2, pos.flatten(2)).view_as(pos)
        tok_ok = tok_ok & (d_key == doc_ids_BS[:, None, Sk - Sq :, None])
    flat = pos.flatten(2)[..., None].expand(B, Hkv, Sq * n * ls, D)
    kg = torch.gather(k, 2, flat).view(B, Hkv, Sq, n * ls, D)
    vg = torch.gather(v, 2, flat).view(B, Hkv, Sq, n * ls, D)
    qg = q.view(B, Hkv, G, Sq, D)
    s = torch.einsum("bkgtd,bktnd->bkgtn", qg.float(), kg.float()) * scale
    s = s.masked_fill(~tok_ok[:, :, None], float("-inf"))
    p = torch.softmax(s, dim=-1)  # the query's own block is always selected: no empty row
    o = torch.einsum("bkgtn,bktnd->bkgtd", p, vg.float())
    return o.reshape(B, H, Sq, D).to(q.dtype)


def nsa_branches_gather(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    k_cmp_BKCD: torch.Tensor,
    v_cmp_BKCD: torch.Tensor,
    geo: NSAGeometry,
    scale: float,
    doc_ids_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same outputs as :func:`longshard.kernels.nsa.naive.nsa_branches_naive`, without S x S masks.

    The compressed branch costs S x S/d; the selected branch S x n x l'; the window S x w
    (through the block-sparse gather kernel). Decoding steps (Sq < Sk) use the naive branches.
    """
    Sq, Sk, Hkv = q_BHSD.shape[2], k_BHSD.shape[2], k_BHSD.shape[1]
    if Sq != Sk:
        return nsa_branches_naive(q_BHSD, k_BHSD, v_BHSD, k_cmp_BKCD, v_cmp_BKCD, geo, scale, doc_ids_BS)
    valid = compressed_valid(geo, Sq, Sk, doc_ids_BS, q_BHSD.device)
    o_cmp, p_cmp = compressed_attention(q_BHSD, k_cmp_BKCD, v_cmp_BKCD, valid, scale)
    idx, ok = select_blocks(geo, p_cmp, Hkv, Sq, Sk)
    o_slc = _selected_gather(q_BHSD, k_BHSD, v_BHSD, idx, ok, geo, scale, doc_ids_BS)
    H = q_BHSD.shape[1]
    blk = min(geo.select_block, 64)
    pattern = sink_window_pattern(-(-Sk // blk), blk, H, torch.ones(H, dtype=torch.bool), 0, geo.window)
    o_win = block_sparse_attention_gather(q_BHSD, k_BHSD, v_BHSD, pattern.to(q_BHSD.device), doc_ids_BS, scale)
    return o_cmp, o_slc, o_win
