"""MoH attention that computes only the (token, head) pairs it uses: shared heads for every token, each
routed head for the tokens that chose it (their queries gathered against that head's causal keys)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from longshard.kernels.moh.gates import MoHGates
from longshard.kernels.moh.naive import moh_attention_naive
from torch.utils.checkpoint import checkpoint


def _masked_sdpa(q_ND: torch.Tensor, k_SD: torch.Tensor, v_SD: torch.Tensor, t_N: torch.Tensor,
                 doc_S: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention of N gathered queries at positions ``t_N`` over one head's keys (causal, same document)."""
    keep = torch.arange(k_SD.shape[0], device=q_ND.device)[None, :] <= t_N[:, None]
    if doc_S is not None:  # the keys (and their document ids) end at the chunk's last query
        keep = keep & (doc_S[None, :] == doc_S[t_N][:, None])
    dt = torch.promote_types(q_ND.dtype, torch.float32)
    return F.scaled_dot_product_attention(q_ND.to(dt)[None], k_SD.to(dt)[None], v_SD.to(dt)[None],
                                          attn_mask=keep[None], scale=scale)[0]


def moh_attention_routed(q_BHSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, gates: MoHGates,
                         scale: float, doc_ids_BS: torch.Tensor | None = None, q_chunk: int = 256) -> torch.Tensor:
    """Same result as :func:`~longshard.kernels.moh.naive.moh_attention_naive`; routed heads cost only the
    tokens that chose them, so attention FLOPs fall with the share of active heads. Shared heads without
    packed documents are one causal flash call; otherwise each chunk of ``q_chunk`` gathered queries
    (ascending) reads the keys up to its last query, under activation checkpointing when training (its
    mask and probabilities are not kept). Decoding steps (Sq < Sk) use the naive form."""
    B, H, S, D = q_BHSD.shape
    K, Sk = k_BKSD.shape[1], k_BKSD.shape[2]
    if S != Sk:
        return moh_attention_naive(q_BHSD, k_BKSD, v_BKSD, gates, scale, doc_ids_BS)
    G = H // K
    Hr = gates.chosen_BSR.shape[-1]
    Hs = H - Hr
    acc = torch.promote_types(q_BHSD.dtype, torch.float32)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q_BHSD, k_BKSD, v_BKSD))
    shared = None
    if Hs and doc_ids_BS is None:  # every token runs these heads: one causal flash call for all of them
        kv = torch.arange(Hs, device=q_BHSD.device) // G
        shared = F.scaled_dot_product_attention(q_BHSD[:, :Hs].to(acc), k_BKSD[:, kv].to(acc), v_BKSD[:, kv].to(acc),
                                                is_causal=True, scale=scale)
    rows = []
    for b in range(B):
        doc = None if doc_ids_BS is None else doc_ids_BS[b]
        heads = [] if shared is None else list(shared[b])
        for h in range(len(heads), H):
            if h < Hs:
                t_N = torch.arange(S, device=q_BHSD.device)
            else:
                t_N = torch.nonzero(gates.chosen_BSR[b, :, h - Hs]).flatten()  # ascending
            out = q_BHSD.new_zeros(S, D, dtype=acc)
            parts = []
            for c in range(0, t_N.numel(), q_chunk):
                t_c = t_N[c : c + q_chunk]
                n_keys = int(t_c[-1]) + 1  # causal: no key of this chunk's queries lies past its last one
                args = (q_BHSD[b, h, t_c], k_BKSD[b, h // G, :n_keys], v_BKSD[b, h // G, :n_keys], t_c,
                        None if doc is None else doc[:n_keys], scale)
                parts.append(checkpoint(_masked_sdpa, *args, use_reentrant=False) if grad else _masked_sdpa(*args))
            if parts:
                out = out.index_put((t_N,), torch.cat(parts).to(out.dtype))
            heads.append(out)
        rows.append(torch.stack(heads))
    o = torch.stack(rows)  # (B, H, S, D): rows of routed heads not chosen stay 0
    return (o * gates.g_BSH.transpose(1, 2)[..., None]).to(q_BHSD.dtype)
