"""NSA geometry shared by every path: compressed-block validity and top-n block selection."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NSAGeometry:
    """Block sizes of native sparse attention.

    Args:
        compress_block: l, tokens summarised by one compressed key/value.
        compress_stride: d, distance between compressed blocks (d <= l).
        select_block: l', tokens per selectable block.
        n_select: blocks each query reads in the selected branch (initial + local ones included).
        n_local: most recent selection blocks always selected (the query's own block included).
        window: w, tokens of the sliding-window branch.
    """

    compress_block: int
    compress_stride: int
    select_block: int
    n_select: int
    n_local: int
    window: int

    def n_compressed(self, k_len: int) -> int:
        block, stride = self.compress_block, self.compress_stride
        return 0 if k_len < block else (k_len - block) // stride + 1


def query_positions(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Absolute positions of the queries (the last ``q_len`` of ``k_len``)."""
    return torch.arange(k_len - q_len, k_len, device=device)


def compressed_valid(
    geo: NSAGeometry, q_len: int, k_len: int, doc_ids_BS: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """(B or 1, 1, Sq, nC) bool: compressed block b is complete before query t (and in its document)."""
    n_c = geo.n_compressed(k_len)
    start = torch.arange(n_c, device=device) * geo.compress_stride
    end = start + geo.compress_block - 1
    t = query_positions(q_len, k_len, device)
    valid = (end[None, :] <= t[:, None])[None, None]
    if doc_ids_BS is not None and n_c:
        d_start, d_end = doc_ids_BS[:, start], doc_ids_BS[:, end]
        d_q = doc_ids_BS[:, k_len - q_len :]
        same = (d_start == d_end)[:, None, :] & (d_end[:, None, :] == d_q[:, :, None])
        valid = valid & same[:, None]
    return valid


def compressed_attention(
    q_BHSD: torch.Tensor, k_cmp_BKCD: torch.Tensor, v_cmp_BKCD: torch.Tensor, valid: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over compressed summaries; rows without a valid summary give zeros.

    Returns:
        ``(o_BHSD, p_BHSC)`` with ``p`` the attention probabilities (fp32).
    """
    B, H, S, D = q_BHSD.shape
    Hkv = k_cmp_BKCD.shape[1]
    if k_cmp_BKCD.shape[2] == 0:
        return torch.zeros_like(q_BHSD), q_BHSD.new_zeros(B, H, S, 0, dtype=torch.float32)
    k = k_cmp_BKCD.float().repeat_interleave(H // Hkv, dim=1)
    v = v_cmp_BKCD.float().repeat_interleave(H // Hkv, dim=1)
    with torch.autocast(q_BHSD.device.type, enabled=False):  # fp32 under autocast too (fp16 would give 0/0)
        s = torch.einsum("bhtd,bhcd->bhtc", q_BHSD.float(), k) * scale
        s = s.masked_fill(~valid, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(s - m)
        p = e / e.sum(-1, keepdim=True).clamp_min(1e-30)
        return torch.einsum("bhtc,bhcd->bhtd", p, v).to(q_BHSD.dtype), p


@torch.no_grad()
def select_blocks(
    geo: NSAGeometry, p_cmp_BHSC: torch.Tensor, n_kv_heads: int, q_len: int, k_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-n selection blocks per query, shared by the heads of a GQA group (no gradient).

    Importance of selection block j = sum over the group's heads and the compressed blocks b of
    p_cmp[b] x (overlap of b with j) / l. The first block and the ``n_local`` most recent blocks
    are always selected; future blocks never.

    Returns:
        ``(idx_BKSN, valid_BKSN)``: selected block indices and whether each slot is real.
    """
    device = p_cmp_BHSC.device
    B, H, S, n_c = p_cmp_BHSC.shape
    ls = geo.select_block
    n_sel = -(-k_len // ls)
    p = p_cmp_BHSC.view(B, n_kv_heads, H // n_kv_heads, S, n_c).sum(2)  # (B, Hkv, Sq, nC)
    start = torch.arange(n_c, device=device) * geo.compress_stride
    blk_start = torch.arange(n_sel, device=device) * ls
    lo = torch.maximum(start[:, None], blk_start[None, :])
    hi = torch.minimum(start[:, None] + geo.compress_block, blk_start[None, :] + ls)
    overlap = (hi - lo).clamp_min(0).float() / geo.compress_block  # (nC, nSel)
    score = torch.einsum("bkts,sj->bktj", p, overlap) if n_c else p.new_zeros(B, n_kv_heads, S, n_sel)
    t_blk = query_positions(q_len, k_len, device) // ls  # (Sq,)
    j = torch.arange(n_sel, device=device)
    future = j[None, :] > t_blk[:, None]
    forced = (j[None, :] == 0) | ((t_blk[:, None] - j[None, :] >= 0) & (t_blk[:, None] - j[None, :] < geo.n_local))
    score = score.masked_fill(forced[None, None], float("inf")).masked_fill(future[None, None], float("-inf"))
    n = min(geo.n_select, n_sel)
    top = score.topk(n, dim=-1)
    return top.indices, top.values > float("-inf")


def selected_token_mask(
    geo: NSAGeometry, idx_BKSN: torch.Tensor, valid_BKSN: torch.Tensor, n_heads: int, k_len: int,
    doc_ids_BS: torch.Tensor | None,
) -> torch.Tensor:
    """(B, H, Sq, Sk) bool keep-mask of the selected branch (causal, same document)."""
    B, Hkv, S, _ = idx_BKSN.shape
    n_sel = -(-k_len // geo.select_block)
    blocks = torch.zeros(B, Hkv, S, n_sel, dtype=torch.bool, device=idx_BKSN.device)
    blocks.scatter_(-1, idx_BKSN, valid_BKSN)
    tok = blocks.repeat_interleave(geo.select_block, dim=-1)[..., :k_len]
    t = query_positions(S, k_len, idx_BKSN.device)
    tok = tok & (torch.arange(k_len, device=t.device)[None, :] <= t[:, None])
    if doc_ids_BS is not None:
        tok = tok & (doc_ids_BS[:, None, k_len - S :, None] == doc_ids_BS[:, None, None, :])
    return tok.repeat_interleave(n_heads // Hkv, dim=1)


def window_token_mask(geo: NSAGeometry, q_len: int, k_len: int, doc_ids_BS: torch.Tensor | None,
                      device: torch.device) -> torch.Tensor:
    """(B or 1, 1, Sq, Sk) bool keep-mask of the sliding-window branch."""
    t = query_positions(q_len, k_len, device)[:, None]
    s = torch.arange(k_len, device=device)[None, :]
    keep = ((s <= t) & (t - s < geo.window))[None, None]
    if doc_ids_BS is not None:
        keep = keep & (doc_ids_BS[:, k_len - q_len :, None] == doc_ids_BS[:, None, :])[:, None]
    return keep
