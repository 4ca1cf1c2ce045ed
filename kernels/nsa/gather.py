"""NSA branches in memory linear in S: per-query gathered selected blocks, block-sparse sliding window."""

from __future__ import annotations

import torch
from longshard.kernels.block_sparse import block_sparse_attention_gather
from longshard.kernels.block_sparse.pattern import sink_window_pattern
from longshard.kernels.block_sparse.triton import (
    block_sparse_attention_triton_mask,
    selection_block_mask,
    triton_runs,
)
from longshard.kernels.nsa.naive import nsa_branches_naive
from longshard.kernels.nsa.select import (
    NSAGeometry,
    compressed_attention,
    compressed_valid,
    query_positions,
    select_blocks,
)
from torch.utils.checkpoint import checkpoint


def _selected_gather(q, k, v, idx, ok, geo: NSAGeometry, scale: float, doc_ids_BS, q_chunk: int = 256,
                     bias_BKSN: torch.Tensor | None = None):
    """Each query attends to the tokens of its own n selected blocks (gathered, not masked).

    Queries are processed in chunks, each under activation checkpointing when training, so the
    gathered keys/values of only one chunk are alive at a time. ``bias_BKSN`` (optional, same shape
    as ``idx``) is added to the logits of every token of the corresponding selected block.
    """
    Sq = q.shape[2]
    outs = []
    for start in range(0, Sq, q_chunk):
        sl = slice(start, min(start + q_chunk, Sq))
        bias = None if bias_BKSN is None else bias_BKSN[:, :, sl]
        args = (q[:, :, sl], k, v, idx[:, :, sl], ok[:, :, sl], start, Sq)
        needs_grad = any(t is not None and t.requires_grad for t in (q, k, v, bias))
        if torch.is_grad_enabled() and needs_grad:
            outs.append(checkpoint(_selected_chunk, *args, geo, scale, doc_ids_BS, bias, use_reentrant=False))
        else:
            outs.append(_selected_chunk(*args, geo, scale, doc_ids_BS, bias))
    return torch.cat(outs, dim=2)


def _selected_triton(q, k, v, idx, ok, geo: NSAGeometry, scale: float, doc_ids_BS):
    """The selected branch through the Triton block-sparse kernel: each query block walks the union of
    its tokens' selected blocks, and each token keeps only the blocks it selected (exact)."""
    sel = torch.where(ok, idx, torch.full_like(idx, -1))
    n_blocks = -(-k.shape[2] // geo.select_block)
    mask = selection_block_mask(sel, q.shape[1], geo.select_block, n_blocks)
    o, _ = block_sparse_attention_triton_mask(q, k, v, mask, geo.select_block, doc_ids_BS=doc_ids_BS, scale=scale,
                                              select_BKSN=sel)
    return o


def _selected_chunk(q, k, v, idx, ok, start: int, q_total: int, geo: NSAGeometry, scale: float, doc_ids_BS,
                    bias_BKSN: torch.Tensor | None = None):
    B, H, Sc, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G, ls, n = H // Hkv, geo.select_block, idx.shape[-1]
    pos = (idx[..., None] * ls + torch.arange(ls, device=q.device)).reshape(B, Hkv, Sc, n * ls)
    tok_ok = ok.repeat_interleave(ls, dim=-1) & (pos < Sk)
    t = query_positions(q_total, Sk, q.device)[start : start + Sc]
    tok_ok = tok_ok & (pos <= t[None, None, :, None])
    pos = pos.clamp_max(Sk - 1)
    if doc_ids_BS is not None:
        d_key = torch.gather(doc_ids_BS[:, None].expand(B, Hkv, Sk), 2, pos.flatten(2)).view_as(pos)
        d_q = doc_ids_BS[:, Sk - q_total + start : Sk - q_total + start + Sc]
        tok_ok = tok_ok & (d_key == d_q[:, None, :, None])
    flat = pos.flatten(2)[..., None].expand(B, Hkv, Sc * n * ls, D)
    kg = torch.gather(k, 2, flat).view(B, Hkv, Sc, n * ls, D)
    vg = torch.gather(v, 2, flat).view(B, Hkv, Sc, n * ls, D)
    qg = q.reshape(B, Hkv, G, Sc, D)
    s = torch.einsum("bkgtd,bktnd->bkgtn", qg.float(), kg.float()) * scale
    if bias_BKSN is not None:
        s = s + bias_BKSN.float().repeat_interleave(ls, dim=-1)[:, :, None]
    s = s.masked_fill(~tok_ok[:, :, None], float("-inf"))
    p = torch.softmax(s, dim=-1)  # the query's own block is always selected: no empty row
    o = torch.einsum("bkgtn,bktnd->bkgtd", p, vg.float())
    return o.reshape(B, H, Sc, D).to(q.dtype)


def nsa_branches_gather(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    k_cmp_BKCD: torch.Tensor,
    v_cmp_BKCD: torch.Tensor,
    geo: NSAGeometry,
    scale: float,
    doc_ids_BS: torch.Tensor | None = None,
    triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same outputs as :func:`longshard.kernels.nsa.naive.nsa_branches_naive`, without S x S masks.

    The compressed branch costs S x S/d; the selected branch S x n x l'; the window S x w
    (through the block-sparse gather kernel). Decoding steps (Sq < Sk) use the naive branches.
    ``triton`` (default: on CUDA when installed and l' is a kernel tile size) runs the selected
    branch through the Triton block-sparse kernel with per-token selection.
    """
    Sq, Sk, Hkv = q_BHSD.shape[2], k_BHSD.shape[2], k_BHSD.shape[1]
    if Sq != Sk:
        return nsa_branches_naive(q_BHSD, k_BHSD, v_BHSD, k_cmp_BKCD, v_cmp_BKCD, geo, scale, doc_ids_BS)
    valid = compressed_valid(geo, Sq, Sk, doc_ids_BS, q_BHSD.device)
    o_cmp, p_cmp = compressed_attention(q_BHSD, k_cmp_BKCD, v_cmp_BKCD, valid, scale)
    idx, ok = select_blocks(geo, p_cmp, Hkv, Sq, Sk)
    if triton is None:
        triton = triton_runs(q_BHSD, geo.select_block)
    selected = _selected_triton if triton else _selected_gather
    o_slc = selected(q_BHSD, k_BHSD, v_BHSD, idx, ok, geo, scale, doc_ids_BS)
    H = q_BHSD.shape[1]
    blk = min(geo.select_block, 64)
    pattern = sink_window_pattern(-(-Sk // blk), blk, H, torch.ones(H, dtype=torch.bool), 0, geo.window)
    o_win = block_sparse_attention_gather(q_BHSD, k_BHSD, v_BHSD, pattern.to(q_BHSD.device), doc_ids_BS, scale)
    return o_cmp, o_slc, o_win
