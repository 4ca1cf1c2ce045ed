"""MoH attention that computes only the (token, head) pairs it uses: shared heads for every token, each
routed head for the tokens that chose it.

The routed heads run batched: per (batch row, routed head) the positions of the tokens that chose it are
compacted on the device (ascending, padded to the longest list), and the lists are read in chunks of
``q_chunk`` entries, one attention call per chunk over every row and routed head at once; a chunk reads
the keys up to the latest query it holds. No per-(row, head) loop and two host synchronisations per call
(the longest list and the chunks' key lengths). With ascending lists a chunk's queries sit close to its
last one, so a routed head costs about (its share of tokens)^2 of a dense causal head plus one chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from longshard.kernels.attention.doc_chunked import causal_attention
from longshard.kernels.attention.fused_cpu import acc_dtype
from longshard.kernels.moh.gates import MoHGates
from longshard.kernels.moh.naive import moh_attention_naive


def _doc_keep(doc_BS: torch.Tensor | None, keep_BXNL: torch.Tensor, t_BXN: torch.Tensor) -> torch.Tensor:
    """``keep`` and, with packed documents, the key's document equal to the query's."""
    if doc_BS is None:
        return keep_BXNL
    L = keep_BXNL.shape[-1]
    d_query_BXN = torch.gather(doc_BS[:, None, :].expand(-1, t_BXN.shape[1], -1), 2, t_BXN)
    return keep_BXNL & (doc_BS[:, None, None, :L] == d_query_BXN[..., None])


def compact_choices(chosen_BRS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the tokens that chose each (row, routed head), ascending, padded.

    Args:
        chosen_BRS: (B, R, S) bool.

    Returns:
        ``(t_BRN, valid_BRN)``: N = the longest list; padding entries hold position 0 and ``valid`` False.
    """
    S = chosen_BRS.shape[-1]
    pos_S = torch.arange(S, device=chosen_BRS.device)
    order_BRS = torch.where(chosen_BRS, pos_S, pos_S + S).argsort(dim=-1)  # chosen first, ascending
    n_BR = chosen_BRS.sum(-1)
    N = int(n_BR.max()) if n_BR.numel() else 0
    valid_BRN = pos_S[:N] < n_BR[..., None]
    return torch.where(valid_BRN, order_BRS[..., :N], 0), valid_BRN


def routed_heads_attention(q_BRSD: torch.Tensor, k_BRSD: torch.Tensor, v_BRSD: torch.Tensor,
                           chosen_BRS: torch.Tensor, scale: float, doc_ids_BS: torch.Tensor | None = None,
                           q_chunk: int = 128) -> torch.Tensor:
    """Causal attention of each routed head for the tokens that chose it; (B, R, S, D), 0 elsewhere.

    Args:
        q_BRSD: the routed heads' queries; k_BRSD, v_BRSD: their keys and values (GQA already expanded).
        chosen_BRS: (B, R, S) bool, which tokens run each head.
        scale: softmax scale.
        doc_ids_BS: (B, S) document ids, or None.
        q_chunk: list entries per attention call.
    """
    B, R, S, D = q_BRSD.shape
    t_BRN, valid_BRN = compact_choices(chosen_BRS)
    N = t_BRN.shape[-1]
    if N == 0:
        return q_BRSD.new_zeros(B, R, S, v_BRSD.shape[-1])
    starts = list(range(0, N, q_chunk))
    n_chunks = len(starts)  # a chunk reads the keys up to its latest query over every row and head
    last_C = F.pad(t_BRN, (0, n_chunks * q_chunk - N)).view(B * R, n_chunks, q_chunk).amax(dim=(0, 2))
    key_lens = (last_C + 1).tolist()  # padding entries (0) never raise it
    parts = []
    for c0, L in zip(starts, key_lens):
        t_BRC = t_BRN[..., c0 : c0 + q_chunk]
        qg = torch.gather(q_BRSD, 2, t_BRC[..., None].expand(-1, -1, -1, D))
        keep = torch.arange(L, device=t_BRC.device) <= t_BRC[..., None]
        keep = _doc_keep(doc_ids_BS, keep, t_BRC)
        parts.append(F.scaled_dot_product_attention(qg, k_BRSD[:, :, :L], v_BRSD[:, :, :L], attn_mask=keep,
                                                    scale=scale))
    o_BRND = torch.cat(parts, dim=2)  # the dtype autocast gave the attention
    out = o_BRND.new_zeros(B, R, S + 1, o_BRND.shape[-1])  # position S takes the padding entries
    index_BRN = torch.where(valid_BRN, t_BRN, S)[..., None].expand(-1, -1, -1, out.shape[-1])
    return out.scatter(2, index_BRN, o_BRND)[:, :, :S]


def _kv_per_head(t_BKSD: torch.Tensor, start: int, stop: int, H: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, stop - start, S, D): the KV head of each query head in [start, stop), copied (its backward sums)."""
    return t_BKSD.to(dtype).index_select(1, torch.arange(start, stop, device=t_BKSD.device) // (H // t_BKSD.shape[1]))


def _heads_kv(t_BKSD: torch.Tensor, start: int, stop: int, H: int, dtype: torch.dtype) -> torch.Tensor:
    """The KV heads of query heads [start, stop), as few as grouped-query attention allows: the KV heads
    themselves when the query heads cover whole groups or lie in one group, else one copy per query head."""
    rep = H // t_BKSD.shape[1]
    if start % rep == 0 and (stop - start) % rep == 0:
        return t_BKSD[:, start // rep : stop // rep].to(dtype)
    if start // rep == (stop - 1) // rep:  # one group: its KV head serves them all
        return t_BKSD[:, start // rep : start // rep + 1].to(dtype)
    return _kv_per_head(t_BKSD, start, stop, H, dtype)


def moh_attention_all_heads(q_BHSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, gates: MoHGates,
                            scale: float, doc_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Same result as :func:`~longshard.kernels.moh.naive.moh_attention_naive` with one causal flash call
    over every head, then the gates (the reference's way: heads not chosen are computed and zeroed).
    Cheaper than the routed path where the gathering costs more than the skipped heads (short sequences).
    Decoding steps (Sq < Sk) use the naive form."""
    B, H, S, D = q_BHSD.shape
    if S != k_BKSD.shape[2]:
        return moh_attention_naive(q_BHSD, k_BKSD, v_BKSD, gates, scale, doc_ids_BS)
    acc = acc_dtype(q_BHSD)
    o = causal_attention(q_BHSD.to(acc), k_BKSD.to(acc), v_BKSD.to(acc), scale, doc_ids_BS)
    return (o * gates.g_BSH.transpose(1, 2)[..., None]).to(q_BHSD.dtype)


def moh_attention_routed(q_BHSD: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor, gates: MoHGates,
                         scale: float, doc_ids_BS: torch.Tensor | None = None, q_chunk: int = 128) -> torch.Tensor:
    """Same result as :func:`~longshard.kernels.moh.naive.moh_attention_naive`; routed heads cost only the
    tokens that chose them, so attention FLOPs fall with the share of active heads. Shared heads are one
    causal attention call (with a document mask when documents are packed); the routed heads are
    :func:`routed_heads_attention`. Decoding steps (Sq < Sk) use the naive form.

    Args: as :func:`~longshard.kernels.moh.naive.moh_attention_naive`; ``q_chunk``: list entries per
    routed attention call.
    """
    B, H, S, D = q_BHSD.shape
    if S != k_BKSD.shape[2]:
        return moh_attention_naive(q_BHSD, k_BKSD, v_BKSD, gates, scale, doc_ids_BS)
    Hr = gates.chosen_BSR.shape[-1]
    Hs = H - Hr
    acc = acc_dtype(q_BHSD)
    heads = []
    if Hs:
        heads.append(causal_attention(q_BHSD[:, :Hs].to(acc), _heads_kv(k_BKSD, 0, Hs, H, acc),
                                      _heads_kv(v_BKSD, 0, Hs, H, acc), scale, doc_ids_BS))
    if Hr:  # the routed path's kernels take one KV head per query head
        k_BRSD, v_BRSD = _kv_per_head(k_BKSD, Hs, H, H, acc), _kv_per_head(v_BKSD, Hs, H, H, acc)
        heads.append(routed_heads_attention(q_BHSD[:, Hs:].to(acc), k_BRSD, v_BRSD,
                                            gates.chosen_BSR.transpose(1, 2), scale, doc_ids_BS, q_chunk))
    o = torch.cat(heads, dim=1) if len(heads) > 1 else heads[0]  # routed rows not chosen stay 0
    return (o * gates.g_BSH.transpose(1, 2)[..., None]).to(q_BHSD.dtype)
