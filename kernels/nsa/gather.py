"""NSA branches in memory linear in S: the selected blocks per query chunk (causal flash for the queries
that select every block they may see, else the union of the chunk's selected blocks under a token mask),
the sliding window through the band kernels of the ``sliding_window`` variant."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from longshard.kernels.attention.doc_chunked import causal_attention
from longshard.kernels.attention.fused_cpu import acc_dtype
from longshard.kernels.block_sparse.chunked import band_far_attention_chunked
from longshard.kernels.block_sparse.pattern import sink_window_spec
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


def _selected_gather(q, k, v, idx, ok, geo: NSAGeometry, scale: float, doc_ids_BS, q_chunk: int = 64,
                     bias_BKSN: torch.Tensor | None = None):
    """Each query attends to the tokens of its own n selected blocks. Without a bias, the leading queries
    that select every block they may see run as one causal flash call; the others run in chunks of
    ``q_chunk`` (:func:`_selected_chunk`), each under activation checkpointing when training, so the
    gathered keys/values of only one chunk are alive at a time. ``bias_BKSN`` (optional, same shape as
    ``idx``) is added to the logits of every token of the corresponding selected block.
    """
    Sq = q.shape[2]
    outs = []
    full = _all_selected(geo, Sq, k.shape[2]) if bias_BKSN is None else 0
    if full:  # these queries select every block they may see: causal attention, flash kernels
        outs.append(causal_attention(q[:, :, :full], k[:, :, :full], v[:, :, :full], scale,
                                     None if doc_ids_BS is None else doc_ids_BS[:, :full]))
    for start in range(full, Sq, q_chunk):
        sl = slice(start, min(start + q_chunk, Sq))
        bias = None if bias_BKSN is None else bias_BKSN[:, :, sl]
        args = (q[:, :, sl], k, v, idx[:, :, sl], ok[:, :, sl], start, Sq)
        needs_grad = any(t is not None and t.requires_grad for t in (q, k, v, bias))
        if torch.is_grad_enabled() and needs_grad:
            outs.append(checkpoint(_selected_chunk, *args, geo, scale, doc_ids_BS, bias, use_reentrant=False))
        else:
            outs.append(_selected_chunk(*args, geo, scale, doc_ids_BS, bias))
    return torch.cat(outs, dim=2)


def _all_selected(geo: NSAGeometry, q_len: int, k_len: int) -> int:
    """How many leading queries select every block at or before them (their visible blocks number at most
    ``n_select``, so the top-n takes them all): for these the selected branch is causal attention. 0 for
    decoding (q_len < k_len)."""
    return min(q_len, geo.n_select * geo.select_block) if q_len == k_len else 0


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
    """One query chunk: the union U of the blocks its tokens selected (per row and KV head) is gathered
    once, every query of the group scores all U blocks in one matmul, and a token mask keeps each query
    to its own blocks (with their bias, if any). Exact: the same keys and logits as a per-query gather,
    computed as one flash call (or, with a bias, dense matmuls) instead of one tiny product per query."""
    B, H, Sc, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G, ls = H // Hkv, geo.select_block
    n_blk = -(-Sk // ls)
    slot_BKSN = torch.where(ok, idx, n_blk)  # invalid slots go to a spare column
    sel_BKSJ = torch.zeros(B, Hkv, Sc, n_blk + 1, dtype=torch.bool, device=q.device)
    sel_BKSJ = sel_BKSJ.scatter(-1, slot_BKSN, True)[..., :n_blk]
    union_BKJ = sel_BKSJ.any(dim=2)
    U = max(1, int(union_BKJ.sum(-1).max()))
    j_J = torch.arange(n_blk, device=q.device)
    blk_BKU = torch.where(union_BKJ, j_J, j_J + n_blk).argsort(dim=-1)[..., :U]  # union blocks first, ascending
    tok_ok = torch.gather(sel_BKSJ, -1, blk_BKU[:, :, None].expand(B, Hkv, Sc, U))  # padding entries: never
    tok_ok = tok_ok.repeat_interleave(ls, dim=-1)  # (B, Hkv, Sc, U * ls)
    pos_BKL = (blk_BKU[..., None] * ls + torch.arange(ls, device=q.device)).flatten(2)
    t = query_positions(q_total, Sk, q.device)[start : start + Sc]
    tok_ok = tok_ok & (pos_BKL[:, :, None, :] < Sk) & (pos_BKL[:, :, None, :] <= t[None, None, :, None])
    pos_BKL = pos_BKL.clamp_max(Sk - 1)
    if doc_ids_BS is not None:
        d_key = torch.gather(doc_ids_BS[:, None].expand(B, Hkv, Sk), 2, pos_BKL)
        d_q = doc_ids_BS[:, Sk - q_total + start : Sk - q_total + start + Sc]
        tok_ok = tok_ok & (d_key[:, :, None, :] == d_q[:, None, :, None])
    flat = pos_BKL[..., None].expand(B, Hkv, U * ls, D)
    kg_BKLD, vg_BKLD = torch.gather(k, 2, flat), torch.gather(v, 2, flat)
    if bias_BKSN is None:  # flash kernel under the token mask: a KV group's heads against its gathered keys
        L = U * ls
        acc = acc_dtype(q)  # fp32 under autocast too, like the other branches
        with torch.autocast(q.device.type, enabled=False):  # (bf16 measured 1.4x slower here on CPU)
            o = F.scaled_dot_product_attention(
                q.reshape(B * Hkv, G, Sc, D).to(acc), kg_BKLD.view(B * Hkv, 1, L, D).to(acc),
                vg_BKLD.view(B * Hkv, 1, L, D).to(acc), attn_mask=tok_ok.view(B * Hkv, 1, Sc, L), scale=scale,
                enable_gqa=True)
        return o.view(B, H, Sc, D).to(q.dtype)
    # a per-block bias (NOSA's importance) trains through an explicit fp32 softmax (SDPA does not
    # differentiate its mask)
    qg = q.reshape(B, Hkv, G * Sc, D).float()
    s = (qg @ kg_BKLD.float().transpose(-1, -2) * scale).view(B, Hkv, G, Sc, U * ls)
    b_BKSJ = torch.zeros(B, Hkv, Sc, n_blk + 1, dtype=torch.float32, device=q.device)
    b_BKSJ = b_BKSJ.scatter(-1, slot_BKSN, bias_BKSN.float())[..., :n_blk]
    b_BKSU = torch.gather(b_BKSJ, -1, blk_BKU[:, :, None].expand(B, Hkv, Sc, U))
    s = s + b_BKSU.repeat_interleave(ls, dim=-1)[:, :, None]
    s = s.masked_fill(~tok_ok[:, :, None], float("-inf"))
    p = torch.softmax(s, dim=-1)  # the query's own block is always selected: no empty row
    o = (p.view(B, Hkv, G * Sc, U * ls) @ vg_BKLD.float()).view(B, Hkv, G, Sc, D)
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

    The compressed branch costs S x S/d; the selected branch S x (the union of a 64-query chunk's
    selected blocks) x l'; the window S x w (the band kernels). Decoding steps (Sq < Sk) use the naive branches.
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
    spec = sink_window_spec(blk, torch.ones(H, dtype=torch.bool), 0, geo.window)  # the sliding_window variant's
    o_win = band_far_attention_chunked(q_BHSD, k_BHSD, v_BHSD, spec, doc_ids_BS, scale=scale)
    return o_cmp, o_slc, o_win
