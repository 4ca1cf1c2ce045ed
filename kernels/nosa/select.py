"""NOSA block selection shared by every path (training, prefill, decoding, offloaded decoding).

Keys are split into blocks of ``block`` tokens. A query at position t (block i) always reads the
``sink_blocks`` leading blocks and the ``local_blocks`` most recent blocks (its own included,
causal inside). The older, complete blocks j with ``sink_blocks <= j <= i - local_blocks`` are
*far* blocks, of which it reads:

* ``static_blocks`` chosen **query-agnostically**: the highest learned importance
  ``s(j) = w_h . mean(K_j) + b_h`` per KV head (an eviction-style score that does not depend on the
  query), and
* ``query_blocks`` chosen **query-aware**: the highest ``sum_g q_g . mean(K_j)`` over the heads of a
  GQA group, among the far blocks not already chosen.

Every far key's logit gets ``log sigmoid(s(j))`` added, which is how the importance score is trained.

Locality: while a decoder stays inside one block, the query-agnostic set does not change (the
scores do not depend on the query), and when a new block becomes far it displaces at most one
static block. So consecutive steps share at least ``static_blocks - 1`` far blocks and at most
``query_blocks + 1`` far blocks need fetching per step, against ``query_blocks + static_blocks``
when every far block is chosen query-aware (``locality=False``, same budget).
Selection carries no gradient; ties go to the lower block index (stable sort), so every path and
every query batch shape selects the same blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class NOSAGeometry:
    """Block budget of NOSA attention.

    Args:
        block: tokens per block.
        sink_blocks: leading blocks every query reads.
        local_blocks: most recent blocks every query reads (its own included).
        query_blocks: far blocks chosen per query by the query-aware score.
        static_blocks: far blocks chosen by the query-agnostic importance score.
        locality: False = choose all ``query_blocks + static_blocks`` far blocks query-aware
            (the unconstrained baseline with the same budget).
    """

    block: int
    sink_blocks: int
    local_blocks: int
    query_blocks: int
    static_blocks: int
    locality: bool = True

    @property
    def select_block(self) -> int:  # the name the shared gather helper reads
        return self.block

    @property
    def n_far(self) -> int:
        return self.query_blocks + self.static_blocks

    @property
    def n_slots(self) -> int:
        """Blocks a query reads at most: sinks + local + far."""
        return self.sink_blocks + self.local_blocks + self.n_far


def block_summaries(k_BKSD: torch.Tensor, block: int) -> torch.Tensor:
    """(B, Hkv, n_complete, D) mean key of every complete block."""
    B, Hkv, S, D = k_BKSD.shape
    n = S // block
    return k_BKSD[:, :, : n * block].reshape(B, Hkv, n, block, D).mean(dim=3)


def importance_bias(
    kbar_BKND: torch.Tensor, w_KD: torch.Tensor, b_K: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance score s (B, Hkv, n) and the logit bias log sigmoid(s) of every complete block."""
    s = torch.einsum("bknd,kd->bkn", kbar_BKND.float(), w_KD.float()) + b_K.float()[None, :, None]
    return s, F.logsigmoid(s)


def _top_stable(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the k highest scores (ties: lower index first) and whether each is a real choice."""
    vals, idx = torch.sort(score, dim=-1, descending=True, stable=True)
    return idx[..., :k], vals[..., :k] > float("-inf")


def far_eligible(geo: NOSAGeometry, q_len: int, k_len: int, n_complete: int, doc_ids_BS: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """(B or 1, 1, Sq, n_complete) bool: block j may be chosen as a far block by query t."""
    t = torch.arange(k_len - q_len, k_len, device=device)
    i = t // geo.block
    j = torch.arange(n_complete, device=device)
    ok = (j[None, :] >= geo.sink_blocks) & (j[None, :] <= i[:, None] - geo.local_blocks)
    ok = ok[None, None]
    if doc_ids_BS is not None and n_complete:
        doc_end = doc_ids_BS[:, j * geo.block + geo.block - 1]  # (B, n): a block belongs to its last token's doc
        doc_q = doc_ids_BS[:, k_len - q_len :]
        ok = ok & (doc_end[:, None, :] == doc_q[:, :, None])[:, None]
    return ok


@torch.no_grad()
def select_far_blocks(
    geo: NOSAGeometry,
    q_BHSD: torch.Tensor,
    kbar_BKND: torch.Tensor,
    score_BKN: torch.Tensor,
    k_len: int,
    doc_ids_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Far blocks of every query, shared by the heads of a GQA group.

    Args:
        geo: block budget.
        q_BHSD: queries, the last Sq of ``k_len`` positions.
        kbar_BKND: mean keys of the complete blocks.
        score_BKN: query-agnostic importance of the complete blocks.
        k_len: number of key positions.
        doc_ids_BS: (B, k_len) document ids or None.

    Returns:
        ``(idx_BKSF, ok_BKSF)`` with F = ``geo.n_far``: block indices (static ones first) and validity.
    """
    B, H, Sq, D = q_BHSD.shape
    Hkv, n = kbar_BKND.shape[1], kbar_BKND.shape[2]
    elig = far_eligible(geo, Sq, k_len, n, doc_ids_BS, q_BHSD.device).expand(B, Hkv, Sq, n)
    neg = float("-inf")
    parts_idx, parts_ok = [], []
    taken = torch.zeros(B, Hkv, Sq, n, dtype=torch.bool, device=q_BHSD.device)
    n_query = geo.query_blocks
    if geo.locality and geo.static_blocks:
        static = score_BKN.float()[:, :, None, :].expand(B, Hkv, Sq, n).masked_fill(~elig, neg)
        idx, ok = _top_stable(static, min(geo.static_blocks, n))
        taken.scatter_(-1, idx, ok)
        parts_idx.append(idx)
        parts_ok.append(ok)
    else:
        n_query += geo.static_blocks
    qs = torch.einsum("bkgtd,bknd->bktn", q_BHSD.float().view(B, Hkv, H // Hkv, Sq, D), kbar_BKND.float())
    qs = qs.masked_fill(~elig | taken, neg)
    idx, ok = _top_stable(qs, min(n_query, n))
    parts_idx.append(idx)
    parts_ok.append(ok)
    idx, ok = torch.cat(parts_idx, dim=-1), torch.cat(parts_ok, dim=-1)
    pad = geo.n_far - idx.shape[-1]
    if pad > 0:
        idx = F.pad(idx, (0, pad))
        ok = F.pad(ok, (0, pad), value=False)
    return idx, ok


def read_slots(
    geo: NOSAGeometry, far_idx_BKSF: torch.Tensor, far_ok_BKSF: torch.Tensor, far_bias_BKN: torch.Tensor,
    q_len: int, k_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every block a query reads (sinks, local, far) with validity and per-block logit bias.

    Returns:
        ``(idx_BKSN, ok_BKSN, bias_BKSN)`` with N = ``geo.n_slots``; sink and local blocks have bias 0.
    """
    B, Hkv, Sq, _ = far_idx_BKSF.shape
    dev = far_idx_BKSF.device
    i = torch.arange(k_len - q_len, k_len, device=dev) // geo.block  # (Sq,)
    sink = torch.arange(geo.sink_blocks, device=dev)[None, :].expand(Sq, -1)
    local = i[:, None] - torch.arange(geo.local_blocks, device=dev)[None, :]
    sink_ok = sink <= i[:, None]
    local_ok = local >= geo.sink_blocks  # earlier ones are sinks (read once) or do not exist
    base_idx = torch.cat([sink, local.clamp_min(0)], dim=-1)[None, None].expand(B, Hkv, Sq, -1)
    base_ok = torch.cat([sink_ok, local_ok], dim=-1)[None, None].expand(B, Hkv, Sq, -1)
    n = far_bias_BKN.shape[-1]
    if n:
        far_bias = torch.gather(far_bias_BKN[:, :, None, :].expand(B, Hkv, Sq, n), 3, far_idx_BKSF.clamp_max(n - 1))
    else:
        far_bias = far_idx_BKSF.new_zeros(far_idx_BKSF.shape, dtype=far_bias_BKN.dtype)
    idx = torch.cat([base_idx, far_idx_BKSF], dim=-1)
    ok = torch.cat([base_ok, far_ok_BKSF], dim=-1)
    bias = torch.cat([far_bias.new_zeros(B, Hkv, Sq, base_idx.shape[-1]), far_bias], dim=-1)
    return idx, ok, bias.masked_fill(~ok, 0.0)
