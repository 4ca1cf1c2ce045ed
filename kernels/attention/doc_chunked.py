"""Causal attention over packed documents without an S x S mask: query chunks, document-bounded keys.

A query only reads keys of its own document at or before it, so a chunk of queries [q0, q1)
needs the keys [k0, q1), where k0 is the first position of any document the chunk's queries
belong to (over the batch). Each chunk is one attention call with a (B, 1, Cq, q1 - k0) mask
(document equality and causality) built on the fly; nothing of size S x S exists at any time,
and the bytes kept for backward are q, k, v, the output and the log-sum-exp: linear in S.

On CPU each chunk runs PyTorch's fused flash kernel (:mod:`longshard.kernels.attention.fused_cpu`)
inside one autograd function whose backward rebuilds the chunk's mask and runs the fused backward
with the saved output and log-sum-exp. Elsewhere (CUDA without flash-attn, or a build without the
CPU ops) each chunk is one ``F.scaled_dot_product_attention`` call under a non-reentrant
checkpoint (its mask and expanded keys are rebuilt in backward, not kept). The reference is
:func:`longshard.kernels.attention.naive.attention_naive` with
:func:`~longshard.kernels.attention.naive.causal_doc_mask`.

Legend: B batch, H query heads, K key/value heads, S sequence, D head dim, C query chunk, N keys
of a chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from longshard.kernels.attention.fused_cpu import acc_dtype, additive_mask, fused_cpu_ops
from torch.utils.checkpoint import checkpoint

MASK_BYTES = 64 * 2**20  # one chunk's additive mask (B x C x N) stays below this
MIN_CHUNK, MAX_CHUNK = 64, 1024


def doc_chunks(doc_ids_BS: torch.Tensor, chunk: int | None = None, elem_bytes: int = 4) -> list[tuple[int, int, int]]:
    """(q0, q1, k0) per query chunk: queries [q0, q1) read keys [k0, q1).

    Args:
        doc_ids_BS: (B, S) document id per position (ids need not be contiguous runs).
        chunk: queries per chunk; None chooses it so one chunk's mask over the whole sequence
            stays below ``MASK_BYTES`` (between ``MIN_CHUNK`` and ``MAX_CHUNK``).
        elem_bytes: bytes per mask element (the query dtype's size).
    """
    B, S = doc_ids_BS.shape
    if chunk is None:
        chunk = max(MIN_CHUNK, min(MAX_CHUNK, MASK_BYTES // max(1, B * S * elem_bytes)))
    pos_BS = torch.arange(S, device=doc_ids_BS.device).expand(B, S)
    ids = doc_ids_BS.long() - doc_ids_BS.min()
    first = torch.full((B, int(ids.max()) + 1), S, dtype=torch.long, device=ids.device)
    first.scatter_reduce_(1, ids, pos_BS, reduce="amin")
    first_BS = first.gather(1, ids)  # first position of each position's document
    out = []
    for q0 in range(0, S, chunk):
        q1 = min(q0 + chunk, S)
        out.append((q0, q1, int(first_BS[:, q0:q1].min())))
    return out


def _chunk_keep(doc_ids_BS: torch.Tensor, q0: int, q1: int, k0: int) -> torch.Tensor:
    """(B, 1, C, N) keep mask of one chunk: same document and key at or before the query."""
    dev = doc_ids_BS.device
    causal = torch.arange(k0, q1, device=dev)[None, :] <= torch.arange(q0, q1, device=dev)[:, None]
    same = doc_ids_BS[:, q0:q1, None] == doc_ids_BS[:, None, k0:q1]
    return (same & causal[None])[:, None]


class _FusedDocChunked(torch.autograd.Function):
    """Fused CPU flash kernel per chunk; backward rebuilds each chunk's mask (nothing S x S saved)."""

    @staticmethod
    def forward(ctx, q_BHSD, k_BKSD, v_BKSD, doc_ids_BS, scale: float, chunks):
        fwd, _ = fused_cpu_ops()
        B, H, S, D = q_BHSD.shape
        rep = H // k_BKSD.shape[1]
        o_BHSD = torch.empty_like(q_BHSD)
        lse_BHS = torch.empty(B, H, S, dtype=acc_dtype(q_BHSD), device=q_BHSD.device)
        for q0, q1, k0 in chunks:
            kc = k_BKSD[:, :, k0:q1].repeat_interleave(rep, 1)
            vc = v_BKSD[:, :, k0:q1].repeat_interleave(rep, 1)
            bias = additive_mask(_chunk_keep(doc_ids_BS, q0, q1, k0), q_BHSD.dtype)
            o, lse = fwd(q_BHSD[:, :, q0:q1], kc, vc, 0.0, False, attn_mask=bias, scale=scale)
            o_BHSD[:, :, q0:q1], lse_BHS[:, :, q0:q1] = o, lse
        ctx.save_for_backward(q_BHSD, k_BKSD, v_BKSD, doc_ids_BS, o_BHSD, lse_BHS)
        ctx.scale, ctx.chunks = scale, chunks
        return o_BHSD

    @staticmethod
    def backward(ctx, grad_BHSD):
        _, bwd = fused_cpu_ops()
        q_BHSD, k_BKSD, v_BKSD, doc_ids_BS, o_BHSD, lse_BHS = ctx.saved_tensors
        B, H, S, D = q_BHSD.shape
        Hk = k_BKSD.shape[1]
        rep = H // Hk
        grad_BHSD = grad_BHSD.contiguous()
        dq = torch.empty_like(q_BHSD)
        dk = torch.zeros(B, Hk, S, D, dtype=torch.float32, device=q_BHSD.device)
        dv = torch.zeros_like(dk)
        for q0, q1, k0 in ctx.chunks:
            kc = k_BKSD[:, :, k0:q1].repeat_interleave(rep, 1)
            vc = v_BKSD[:, :, k0:q1].repeat_interleave(rep, 1)
            bias = additive_mask(_chunk_keep(doc_ids_BS, q0, q1, k0), q_BHSD.dtype)
            g = bwd(grad_BHSD[:, :, q0:q1], q_BHSD[:, :, q0:q1], kc, vc, o_BHSD[:, :, q0:q1],
                    lse_BHS[:, :, q0:q1], 0.0, False, attn_mask=bias, scale=ctx.scale)
            dq[:, :, q0:q1] = g[0]
            N = q1 - k0
            dk[:, :, k0:q1] += g[1].view(B, Hk, rep, N, D).sum(2, dtype=torch.float32)
            dv[:, :, k0:q1] += g[2].view(B, Hk, rep, N, D).sum(2, dtype=torch.float32)
        return dq, dk.to(k_BKSD.dtype), dv.to(v_BKSD.dtype), None, None, None


def _sdpa_chunk(q_BHCD, k_BKND, v_BKND, doc_ids_BS, q0: int, q1: int, k0: int, scale: float):
    rep = q_BHCD.shape[1] // k_BKND.shape[1]
    keep = _chunk_keep(doc_ids_BS, q0, q1, k0)
    return F.scaled_dot_product_attention(q_BHCD, k_BKND.repeat_interleave(rep, 1),
                                          v_BKND.repeat_interleave(rep, 1), attn_mask=keep, scale=scale)


def doc_chunked_attention(
    q_BHSD: torch.Tensor,
    k_BKSD: torch.Tensor,
    v_BKSD: torch.Tensor,
    doc_ids_BS: torch.Tensor,
    scale: float,
    chunk: int | None = None,
    fused: bool | None = None,
) -> torch.Tensor:
    """Causal attention restricted to same-document pairs, in query chunks (no S x S mask).

    Args:
        q_BHSD: queries; k_BKSD, v_BKSD: keys/values with K dividing H (GQA/MQA).
        doc_ids_BS: (B, S) document id of each position.
        scale: softmax scale.
        chunk: queries per chunk (None: see :func:`doc_chunks`).
        fused: True/False forces the fused CPU kernel or the checkpointed SDPA route; None picks
            the fused kernel on CPU when this build has it.

    Returns:
        (B, H, S, D) output in the query's dtype.
    """
    chunks = doc_chunks(doc_ids_BS, chunk, q_BHSD.element_size())
    if fused is None:
        fused = q_BHSD.device.type == "cpu" and fused_cpu_ops() is not None
    if fused:
        return _FusedDocChunked.apply(q_BHSD, k_BKSD, v_BKSD, doc_ids_BS, scale, chunks)
    outs = []
    for q0, q1, k0 in chunks:
        args = (q_BHSD[:, :, q0:q1], k_BKSD[:, :, k0:q1], v_BKSD[:, :, k0:q1], doc_ids_BS, q0, q1, k0, scale)
        if torch.is_grad_enabled() and q_BHSD.requires_grad | k_BKSD.requires_grad | v_BKSD.requires_grad:
            outs.append(checkpoint(_sdpa_chunk, *args, use_reentrant=False))
        else:
            outs.append(_sdpa_chunk(*args))
    return torch.cat(outs, dim=2)


def causal_attention(q_BHSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, scale: float,
                     doc_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention (Sq == Sk) with K dividing H and no copies of the KV heads: one SDPA call (flash
    kernels), or :func:`doc_chunked_attention` within documents when ``doc_ids_BS`` is given."""
    if doc_ids_BS is None:
        return F.scaled_dot_product_attention(q_BHSD, k_BKSD, v_BKSD, is_causal=True, scale=scale, enable_gqa=True)
    return doc_chunked_attention(q_BHSD, k_BKSD, v_BKSD, doc_ids_BS, scale)
