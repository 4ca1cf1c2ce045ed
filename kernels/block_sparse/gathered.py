"""Block-sparse attention of local queries over a buffer of key blocks with known global positions.

The sparsity-aware exchange leaves each rank with its own zigzag tokens plus the key blocks its
peers sent, per KV head, in no particular order. This attends them block-sparsely without a
score matrix over the whole buffer: the queries are cut into chunks of ``chunk_blocks`` blocks;
for each chunk and head, the buffer's key blocks that the pattern keeps for some query block of
the chunk are gathered (kept blocks first, in buffer order) and attended in one fused call with
the token-level mask (causality, windows, sinks, documents) on global positions.

On CPU each chunk is one call of PyTorch's fused flash kernel inside an autograd function that
saves only q, the key/value buffers, the output and the log-sum-exp; its backward rebuilds each
chunk's gather and mask and runs the fused backward. Elsewhere (CUDA) each chunk is
``F.scaled_dot_product_attention`` under a non-reentrant checkpoint (the gather, mask and scores
are rebuilt in backward), so memory stays linear in the local length either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from longshard.kernels.attention.fused_cpu import acc_dtype, additive_mask, fused_cpu_ops
from longshard.kernels.block_sparse.pattern import SparsePattern, kept_first, token_keep
from torch.utils.checkpoint import checkpoint


@dataclass
class BufferLayout:
    """Where local queries and buffered keys sit in the global sequence.

    Args:
        q_pos_L: (L,) global position of each local query; each run of ``block`` queries is one block.
        k_pos_KN: (Hkv, N) global position of each buffered key per KV head, -1 = padding; each run
            of ``block`` slots is one block.
        doc_ids_BS: (B, S) global document ids, or None (one document).
    """

    q_pos_L: torch.Tensor
    k_pos_KN: torch.Tensor
    doc_ids_BS: torch.Tensor | None = None


@dataclass
class _HeadLayout:
    """What every chunk reads of a :class:`BufferLayout`, expanded to the query heads once per call."""

    lay: BufferLayout
    heads_H: torch.Tensor  # (H,) query-head indices
    k_pos_HN: torch.Tensor  # (H, N) buffered key positions seen by each query head
    kb_HN: torch.Tensor  # (H, NB) global key block of each buffer block, -1 = padding

    @classmethod
    def build(cls, lay: BufferLayout, H: int, blk: int) -> _HeadLayout:
        Hkv = lay.k_pos_KN.shape[0]
        heads = torch.arange(H, device=lay.k_pos_KN.device)
        k_pos_HN = lay.k_pos_KN[heads // (H // Hkv)]
        kb_HN = torch.where(k_pos_HN[:, ::blk] >= 0, k_pos_HN[:, ::blk] // blk, -1)
        return cls(lay, heads, k_pos_HN, kb_HN)


def _chunk_keys(pattern: SparsePattern, hl: _HeadLayout, q0: int, q1: int):
    """(token index (H, T) into the buffer, keep mask (B or 1, H, Cq, T)) of queries [q0, q1)."""
    blk, lay, heads, kb_HN = pattern.block, hl.lay, hl.heads_H, hl.kb_HN
    dev = kb_HN.device
    H = heads.shape[0]
    qb_C = lay.q_pos_L[q0:q1:blk] // blk  # (C,) global query blocks of the chunk
    bm = pattern.block_mask_HQN[heads[:, None, None], qb_C[None, :, None], kb_HN.clamp_min(0)[:, None, :]]
    need_HN = (bm & (kb_HN[:, None, :] >= 0) & (kb_HN[:, None, :] <= qb_C[None, :, None])).any(1)  # (H, NB)
    n_keep = max(int(need_HN.sum(1).max()), 1)
    order = kept_first(need_HN)
    slot_Hn = order[:, :n_keep]  # (H, n) buffer blocks, kept ones first
    ok_Hn = torch.gather(need_HN, 1, slot_Hn)
    tok_HT = (slot_Hn[..., None] * blk + torch.arange(blk, device=dev)).reshape(H, n_keep * blk)
    kpos_HT = torch.gather(hl.k_pos_HN, 1, tok_HT)
    valid_HT = ok_Hn.repeat_interleave(blk, dim=1) & (kpos_HT >= 0)
    q_pos = lay.q_pos_L[q0:q1]
    keep = token_keep(pattern, q_pos[None, :, None], kpos_HT.clamp_min(0)[:, None, :], heads[:, None, None])
    keep = (keep & valid_HT[:, None, :])[None]  # (1, H, Cq, T)
    if lay.doc_ids_BS is not None:
        d_q = lay.doc_ids_BS[:, q_pos]  # (B, Cq)
        d_k = lay.doc_ids_BS[:, kpos_HT.clamp_min(0)]  # (B, H, T)
        keep = keep & (d_q[:, None, :, None] == d_k[:, :, None, :])
    return tok_HT, keep


def _gather(x_BKND: torch.Tensor, tok_HT: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D): buffered keys/values at ``tok_HT``, KV heads repeated to the query heads."""
    H = tok_HT.shape[0]
    kv_of_h = torch.arange(H, device=x_BKND.device) // (H // x_BKND.shape[1])
    return x_BKND[:, kv_of_h[:, None], tok_HT]


def _chunks(L: int, blk: int, chunk_blocks: int) -> list[tuple[int, int]]:
    step = blk * chunk_blocks
    return [(a, min(a + step, L)) for a in range(0, L, step)]


class _FusedGathered(torch.autograd.Function):
    """Each query chunk as one fused CPU flash call; backward rebuilds gathers and masks per chunk."""

    @staticmethod
    def forward(ctx, q_BHLD, k_BKND, v_BKND, pattern, hl, scale, chunk_blocks):
        fwd, _ = fused_cpu_ops()
        outs, lses = [], []
        for q0, q1 in _chunks(q_BHLD.shape[2], pattern.block, chunk_blocks):
            tok, keep = _chunk_keys(pattern, hl, q0, q1)
            o, lse = fwd(q_BHLD[:, :, q0:q1], _gather(k_BKND, tok), _gather(v_BKND, tok), 0.0, False,
                         attn_mask=additive_mask(keep, q_BHLD.dtype), scale=scale)
            row_ok = keep.any(-1)  # a row with no key reads nothing: output 0
            outs.append(torch.where(row_ok[..., None], o, torch.zeros((), dtype=o.dtype)))
            lses.append(lse.to(acc_dtype(q_BHLD)).masked_fill(~row_ok, float("-inf")))
        o = torch.cat(outs, dim=2)
        lse = torch.cat(lses, dim=2)
        ctx.save_for_backward(q_BHLD, k_BKND, v_BKND, o, lse)
        ctx.pattern, ctx.hl, ctx.scale, ctx.chunk_blocks = pattern, hl, scale, chunk_blocks
        return o

    @staticmethod
    def backward(ctx, grad_BHLD):
        _, bwd = fused_cpu_ops()
        q, k, v, o, lse = ctx.saved_tensors
        B, H, L, D = q.shape
        Hkv, N = k.shape[1], k.shape[2]
        acc = acc_dtype(q)
        dq = torch.zeros_like(q)
        dk_H = torch.zeros(B, H, N, D, dtype=acc, device=q.device)
        dv_H = torch.zeros(B, H, N, v.shape[-1], dtype=acc, device=q.device)
        safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        for q0, q1 in _chunks(L, ctx.pattern.block, ctx.chunk_blocks):
            tok, keep = _chunk_keys(ctx.pattern, ctx.hl, q0, q1)
            g_c = grad_BHLD[:, :, q0:q1].contiguous()
            dq_c, dk_c, dv_c = bwd(g_c, q[:, :, q0:q1], _gather(k, tok), _gather(v, tok), o[:, :, q0:q1].contiguous(),
                                   safe_lse[:, :, q0:q1].contiguous(), 0.0, False,
                                   attn_mask=additive_mask(keep, q.dtype), scale=ctx.scale)
            dq[:, :, q0:q1] = dq_c
            idx = tok[None, :, :, None].expand(B, H, -1, D)
            dk_H.scatter_add_(2, idx, dk_c.to(acc))
            dv_H.scatter_add_(2, idx, dv_c.to(acc))
        dk = dk_H.view(B, Hkv, H // Hkv, N, D).sum(2)
        dv = dv_H.view(B, Hkv, H // Hkv, N, -1).sum(2)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def _sdpa_chunk(q_c, k_BKND, v_BKND, pattern, hl, q0, q1, scale):
    tok, keep = _chunk_keys(pattern, hl, q0, q1)
    o = F.scaled_dot_product_attention(q_c, _gather(k_BKND, tok), _gather(v_BKND, tok), attn_mask=keep, scale=scale)
    return torch.where(keep.any(-1)[..., None], o, torch.zeros((), dtype=o.dtype, device=o.device))


def gathered_block_attention(
    q_BHLD: torch.Tensor, k_BKND: torch.Tensor, v_BKND: torch.Tensor, pattern: SparsePattern, lay: BufferLayout,
    scale: float | None = None, chunk_blocks: int = 4, fused: bool | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention of local queries over buffered key blocks (see the module docstring).

    Args:
        q_BHLD: (B, H, L, D) local queries, L a multiple of ``pattern.block``.
        k_BKND, v_BKND: (B, Hkv, N, D) key/value buffer, N a multiple of the block.
        pattern: the block pattern over global blocks (its token rules apply on global positions).
        lay: positions of queries and buffered keys (and global document ids).
        scale: softmax scale, default 1/sqrt(D).
        chunk_blocks: query blocks per fused call.
        fused: use the fused CPU kernel (None = on CPU when available; False = checkpointed SDPA per chunk).

    Returns:
        (B, H, L, D) in the dtype of ``q_BHLD``; rows that read no key are 0.
    """
    scale = 1.0 / math.sqrt(q_BHLD.shape[-1]) if scale is None else scale
    if fused is None:
        fused = q_BHLD.device.type == "cpu" and fused_cpu_ops() is not None
    hl = _HeadLayout.build(lay, q_BHLD.shape[1], pattern.block)  # shared by every chunk, forward and backward
    if fused:
        return _FusedGathered.apply(q_BHLD, k_BKND, v_BKND, pattern, hl, scale, chunk_blocks)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_BHLD, k_BKND, v_BKND))
    outs = []
    for q0, q1 in _chunks(q_BHLD.shape[2], pattern.block, chunk_blocks):
        args = (q_BHLD[:, :, q0:q1], k_BKND, v_BKND, pattern, hl, q0, q1, scale)
        outs.append(checkpoint(_sdpa_chunk, *args, use_reentrant=False) if grad else _sdpa_chunk(*args))
    return torch.cat(outs, dim=2)


def block_sparse_attention_fused(
    q_BHSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, pattern: SparsePattern,
    doc_ids_BS: torch.Tensor | None = None, scale: float | None = None, chunk_blocks: int = 2,
) -> torch.Tensor:
    """Block-sparse causal attention of one whole sequence (Sq == Sk) through the fused CPU kernel: the
    buffer path above with every key in place (query chunks of ``chunk_blocks`` blocks, each with the
    union of its blocks' kept key blocks gathered; saved for backward: q, k, v, output, log-sum-exp).
    For patterns without a band + far form (PowerAttention: the far blocks move with the query).

    Args: as :func:`longshard.kernels.block_sparse.naive.block_sparse_attention_naive`, plus
        chunk_blocks: query blocks per fused call (more = fewer calls, more masked keys per call).
    """
    B, H, S, D = q_BHSD.shape
    blk = pattern.block
    n = math.ceil(S / blk)
    pad = n * blk - S
    q_p, k_p, v_p = (F.pad(t, (0, 0, 0, pad)) if pad else t for t in (q_BHSD, k_BKSD, v_BKSD))
    pos = torch.arange(n * blk, device=q_BHSD.device)
    k_pos_KN = torch.where(pos < S, pos, -1)[None].expand(k_BKSD.shape[1], -1)  # padded keys: none
    if doc_ids_BS is not None and pad:  # padded query rows: a document of their own (they read nothing)
        doc_ids_BS = F.pad(doc_ids_BS, (0, pad), value=-1)
    lay = BufferLayout(pos, k_pos_KN, doc_ids_BS)
    return gathered_block_attention(q_p, k_p, v_p, pattern, lay, scale, chunk_blocks)[:, :, :S]
