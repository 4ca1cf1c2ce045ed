"""DMA's content-aware mask: a bias per key from its value, and the key blocks each query block keeps.

Per KV head h and key j: ``bias_j = A_h * softplus(Delta_h . v_j)`` (trainable A_h, Delta_h), added to
the logits of the keys a query reads. Each query block keeps its own (diagonal) block and the
``keep_blocks - 1`` earlier key blocks with the highest mean *detached* bias, so the selection is a
constant of the step and no gradient passes through the top-k; the bias itself is trained through the
kept keys' logits.

The published form (flash-dmattn / transformers' Doge, ``DogeAttention``) differs in three ways, each an
option here: ``dt_proj`` is one ``Linear(K*D -> K)`` over every KV head's values, optionally with a bias
(``delta_KF`` of shape (K, K*D) and ``dt_bias_K``); the bias is ``exp(A_h * softplus(dt))``
(``exp_bias``); each query keeps its top-w keys among every key it may see, its own included only when
it ranks (``keep_own=False`` at ``block = 1``). Tie rule, in both forms: among equal scores the earlier
key block (key) is kept first (a stable sort), so with A = 0, where every score ties, a query keeps the
earliest candidates. Shapes: B batch, K KV heads, S positions, D head dim, F = K*D, Q query blocks,
N key blocks, M kept blocks per query block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from longshard.kernels.attention.fused_cpu import acc_dtype


def dma_key_bias(v_BKSD: torch.Tensor, a_K: torch.Tensor, delta: torch.Tensor, dt_bias_K: torch.Tensor | None = None,
                 exp_bias: bool = False) -> torch.Tensor:
    """(B, K, S) logit bias of every key, in fp32 (fp64 for fp64 input).

    ``A_h * softplus(dt_hj)`` (``exp_bias``: ``exp`` of that, the reference's form) with ``dt_hj`` the
    projection of key j's values: ``Delta_h . v_hj`` for ``delta`` of shape (K, D) (longshard's: each KV
    head from its own values), or ``W_h . [v_1j, ..., v_Kj]`` for shape (K, K*D) (the reference's full
    ``dt_proj``; with one KV head the two are the same), plus ``dt_bias_K`` when given.

    softplus is computed stably for any magnitude (``F.softplus`` switches to the identity above its
    threshold), so large values give large finite biases, not Inf (``exp_bias`` overflows past ~88 in
    fp32, as the reference does). Computed in fp32 under autocast too: the selection ranks blocks by this
    bias, and bf16 rounding would reorder close blocks.
    """
    dt = acc_dtype(v_BKSD)
    B, K, S, D = v_BKSD.shape
    with torch.autocast(v_BKSD.device.type, enabled=False):  # fp32 under bf16/fp16 autocast too
        if delta.shape[-1] == D:
            proj_BKS = torch.einsum("bksd,kd->bks", v_BKSD.to(dt), delta.to(dt))
        else:
            v_BSF = v_BKSD.to(dt).transpose(1, 2).reshape(B, S, K * D)
            proj_BKS = torch.einsum("bsf,kf->bks", v_BSF, delta.to(dt))
        if dt_bias_K is not None:
            proj_BKS = proj_BKS + dt_bias_K.to(dt)[None, :, None]
        z_BKS = a_K.to(dt)[None, :, None] * F.softplus(proj_BKS)
        return z_BKS.exp() if exp_bias else z_BKS


def block_scores(bias_BKS: torch.Tensor, block: int) -> torch.Tensor:
    """(B, K, N) mean bias of each key block (the last block may be partial: mean of its keys)."""
    B, K, S = bias_BKS.shape
    n = -(-S // block)
    padded = F.pad(bias_BKS, (0, n * block - S))
    counts = torch.full((n,), float(block), dtype=bias_BKS.dtype, device=bias_BKS.device)
    counts[-1] = S - (n - 1) * block
    return padded.view(B, K, n, block).sum(-1) / counts


@torch.no_grad()
def select_key_blocks(bias_BKS: torch.Tensor, block: int, keep_blocks: int, q_len: int, k_len: int,
                      doc_ids_BS: torch.Tensor | None = None,
                      keep_own: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Key blocks each query block reads, chosen by the detached bias.

    With packed documents an earlier key block is a candidate only when its last token belongs to the
    document of the query block's first or last token (a block wholly inside another document would
    spend the budget on keys the document mask hides).

    Args:
        bias_BKS: per-key bias (its values only are used).
        block: tokens per block.
        keep_blocks: blocks each query block reads, its own included.
        q_len: query positions: the last ``q_len`` of the ``k_len`` key positions.
        k_len: key positions.
        doc_ids_BS: (B, k_len) document ids, or None.
        keep_own: keep each query block's own block and rank only the earlier ones (longshard's rule);
            False (``block`` must be 1: a block's score would read later keys): the top ``keep_blocks``
            keys among all a query may see, its own key as one candidate (the reference's top-w).

    Returns:
        ``(idx_BKQM, ok_BKQM, q0)``: block indices (with ``keep_own`` the diagonal block last), whether each
        slot is a real choice (a query block with fewer candidates than the budget leaves slots unused),
        and the absolute index of the first query block.
    """
    if not keep_own and block != 1:
        raise ValueError(f"keep_own=False ranks a query's own key among the others: block must be 1, got {block}")
    B, K, _ = bias_BKS.shape
    n = -(-k_len // block)
    q0 = (k_len - q_len) // block
    qb_Q = torch.arange(q0, n, device=bias_BKS.device)
    score = block_scores(bias_BKS.detach(), block)  # (B, K, N)
    j_N = torch.arange(n, device=bias_BKS.device)
    ok_BQN = ((j_N[None, :] < qb_Q[:, None]) if keep_own else (j_N[None, :] <= qb_Q[:, None]))[None]
    if doc_ids_BS is not None:
        last_doc_BN = doc_ids_BS[:, ((j_N + 1) * block).clamp_max(k_len) - 1]
        q_first_BQ = doc_ids_BS[:, qb_Q * block]
        q_last_BQ = doc_ids_BS[:, ((qb_Q + 1) * block).clamp_max(k_len) - 1]
        ok_BQN = ok_BQN & ((last_doc_BN[:, None, :] == q_first_BQ[:, :, None])
                           | (last_doc_BN[:, None, :] == q_last_BQ[:, :, None]))
    cand = score[:, :, None, :].expand(B, K, qb_Q.numel(), n).masked_fill(~ok_BQN[:, None], float("-inf"))
    m = min(keep_blocks - 1 if keep_own else keep_blocks, n)
    vals, idx = torch.sort(cand, dim=-1, descending=True, stable=True)  # ties: the earlier block first
    far_idx, far_ok = idx[..., :m], vals[..., :m] > float("-inf")
    if not keep_own:
        return far_idx, far_ok, q0
    diag = qb_Q[None, None, :, None].expand(B, K, qb_Q.numel(), 1)
    idx = torch.cat([far_idx, diag], dim=-1)
    ok = torch.cat([far_ok, torch.ones_like(diag, dtype=torch.bool)], dim=-1)
    return idx, ok, q0


def dma_kept_fraction(seq_len: int, block: int, keep_blocks: int) -> float:
    """Share of the causal (query, key) pairs DMA reads at ``seq_len``: a query in block i reads
    min(i, keep_blocks - 1) whole earlier blocks and its own block up to itself."""
    if seq_len <= 0:
        return 1.0
    kept = 0
    for i in range(-(-seq_len // block)):
        n_q = min(block, seq_len - i * block)
        kept += n_q * min(i, keep_blocks - 1) * block + n_q * (n_q + 1) // 2
    return kept / (seq_len * (seq_len + 1) / 2)
