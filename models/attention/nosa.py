"""NOSA-style native, offloadable sparse attention.

Each query reads sink blocks, its local blocks and ``query_blocks + static_blocks`` far blocks:
``static_blocks`` picked by a learned query-agnostic importance score per KV head (an eviction
head: ``s(j) = w . mean(K_j) + b``) and ``query_blocks`` picked query-aware (group-summed
``q . mean(K_j)``), see :mod:`longshard.kernels.nosa.select`. Far keys get ``log sigmoid(s(j))``
added to their logits, which trains the importance score. Because the static part does not depend
on the query, consecutive decoding steps reuse most far blocks: with the KV cache in host memory
only the changed blocks travel (:mod:`longshard.models.offload`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from longshard.errors import require, require_positive
from longshard.kernels.attention.naive import attention_gathered
from longshard.kernels.nosa import (
    NOSAGeometry,
    importance_bias,
    nosa_attention_gather,
    nosa_attention_naive,
    select_far_blocks,
)
from longshard.kernels.nosa.select import read_slots
from longshard.models.attention.registry import (
    AttentionBatch,
    AttentionContext,
    AttentionOptions,
    CoreAttention,
    DecodePlan,
    budget_kept_fraction,
    dense_attention_flops,
    gqa_kv_slice,
    register_attention,
)
from torch import nn


@dataclass(kw_only=True)
class NOSAOptions(AttentionOptions):
    """Options of ``nosa``.

    Args:
        block: tokens per block (the unit of selection and of host<->device transfer).
        sink_blocks: leading blocks every query reads.
        local_blocks: most recent blocks every query reads (its own included).
        query_blocks: far blocks chosen per query (query-aware).
        static_blocks: far blocks chosen by the learned query-agnostic importance score.
        locality: False chooses all far blocks query-aware (the baseline without NOSA's locality
            constraint, same budget).
        importance_init: initial bias b of the importance score (log sigmoid(b) ~ 0 for large b,
            so a fresh layer starts as plain block-sparse attention).
        path: ``auto`` (= gather), ``gather`` or ``naive``.
    """

    block: int = 64
    sink_blocks: int = 1
    local_blocks: int = 2
    query_blocks: int = 4
    static_blocks: int = 4
    locality: bool = True
    importance_init: float = 4.0
    path: str = "auto"

    def __post_init__(self) -> None:
        for name in ("block", "local_blocks"):
            require_positive(getattr(self, name), name)
        for name in ("sink_blocks", "query_blocks", "static_blocks"):
            require(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}.")
        require(self.path in ("auto", "gather", "naive"), "path", f"unknown path {self.path!r}.",
                "use auto, gather or naive.")

    def geometry(self) -> NOSAGeometry:
        return NOSAGeometry(self.block, self.sink_blocks, self.local_blocks, self.query_blocks,
                            self.static_blocks, self.locality)

    def tensor_parallel_problem(self) -> str | None:
        return "nosa has per-head parameters (its block-importance scorer)"


@register_attention("nosa", NOSAOptions)
class NOSAAttention(CoreAttention):
    """NOSA: query-agnostic (learned importance) + query-aware block selection with sinks and local blocks."""

    covers_context = False  # far blocks are a budget, not a cover
    supports_offload = True

    def __init__(self, ctx: AttentionContext, opts: NOSAOptions) -> None:
        super().__init__(ctx, opts)
        self.geo = opts.geometry()
        self.scale = 1.0 / math.sqrt(ctx.head_dim)
        self.importance_w = nn.Parameter(torch.empty(ctx.n_kv_heads, ctx.head_dim))
        self.importance_b = nn.Parameter(torch.empty(ctx.n_kv_heads))
        self.reset_variant_parameters()

    @torch.no_grad()
    def reset_variant_parameters(self) -> None:
        """w = 0, b = importance_init: every far block starts with the same small bias."""
        self.importance_w.zero_()
        self.importance_b.fill_(self.opts.importance_init)

    def set_head_slice(self, start: int, stop: int) -> None:
        """Run query heads [start, stop) (Ulysses); the importance score of their KV heads is used."""
        self.kv_slice = gqa_kv_slice(self.ctx, start, stop, "nosa's query-aware block selection")

    def _importance(self) -> tuple[torch.Tensor, torch.Tensor]:
        kv = getattr(self, "kv_slice", None)
        if kv is None:
            return self.importance_w, self.importance_b
        return self.importance_w[kv[0] : kv[1]], self.importance_b[kv[0] : kv[1]]

    def forward(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch):
        fn = nosa_attention_naive if self.opts.path == "naive" else nosa_attention_gather
        w, b = self._importance()
        return fn(q_BHSD, k_BHSD, v_BHSD, w, b, self.geo, self.scale, batch.doc_ids_BS)

    # --- offloaded decoding -------------------------------------------------------------------
    @property
    def block(self) -> int:
        return self.opts.block

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Each query reads at most its block budget (sinks + local + far blocks)."""
        return dense_attention_flops(self.ctx.n_heads, self.ctx.head_dim, seq_len, self.geo.n_slots * self.opts.block)

    def kept_fraction(self, seq_len: int) -> float:
        """Each query reads at most its block budget of its prefix."""
        return budget_kept_fraction(seq_len, self.geo.n_slots * self.opts.block)

    def decode_block_budget(self) -> int:
        """Most blocks one decoding step reads per KV head (sinks + local + far)."""
        return self.geo.n_slots

    @torch.no_grad()
    def decode_plan(self, q_BH1D: torch.Tensor, kbar_BKND: torch.Tensor, k_len: int) -> DecodePlan:
        """Blocks (complete ones) one decoding query reads, with their logit bias."""
        score, far_bias = importance_bias(kbar_BKND, *self._importance())
        far_idx, far_ok = select_far_blocks(self.geo, q_BH1D, kbar_BKND, score, k_len)
        idx, ok, bias = read_slots(self.geo, far_idx, far_ok, far_bias, 1, k_len)
        n_complete = kbar_BKND.shape[2]
        ok = ok & (idx < n_complete)  # the current, incomplete block is the device-resident tail
        return DecodePlan(idx[:, :, 0].masked_fill(~ok[:, :, 0], -1), bias[:, :, 0])

    def attend_blocks(self, q_BH1D: torch.Tensor, k_BKLD: torch.Tensor, v_BKLD: torch.Tensor,
                      kpos_BKL: torch.Tensor, bias_BKL: torch.Tensor | None, k_len: int) -> torch.Tensor:
        """Attention of one decoding query over gathered keys (positions ``kpos``, -1 = padding)."""
        return attention_gathered(q_BH1D, k_BKLD, v_BKLD, kpos_BKL >= 0, bias_BKL, self.scale)

