"""Native sparse attention (NSA-style): compressed, selected and sliding-window branches, gated.

Per query: (1) attention over learned summaries of key/value blocks (length ``compress_block``,
stride ``compress_stride``; a linear map of the block plus an intra-block position embedding,
initialised to mean pooling); (2) exact attention over the ``n_select`` selection blocks with the
highest importance, derived from branch (1)'s probabilities and shared by the heads of a GQA group
(the first block and the ``n_local`` most recent blocks are always kept); (3) a sliding window.
The branches are mixed by sigmoid gates computed from the layer input: out = sum_b g_b * o_b.
Selection is per query token and carries no gradient (as in the paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from longshard.errors import require, require_positive
from longshard.kernels.nsa import NSAGeometry, nsa_branches_gather, nsa_branches_naive
from longshard.models.attention.registry import (
    AttentionBatch,
    AttentionContext,
    AttentionOptions,
    CoreAttention,
    budget_kept_fraction,
    dense_attention_flops,
    gqa_kv_slice,
    register_attention,
)
from torch import nn


@dataclass(kw_only=True)
class NSAOptions(AttentionOptions):
    """Options of ``nsa`` (defaults: the NSA paper's).

    Args:
        compress_block: l, tokens per compressed summary.
        compress_stride: d, stride of the summaries (divides l).
        select_block: l', tokens per selection block (a multiple of d).
        n_select: selected blocks per query (initial and local blocks included).
        n_local: most recent blocks always selected (the query's own included).
        window: sliding-window branch length.
        gate_bias: initial gate logits of the (compressed, selected, window) branches; the gate
            weights start at zero, so every token starts with sigmoid of these. Default -ln 2:
            each gate 1/3, the output starts as the mean of the branches (gates at 0.5 each, a
            1.5x sum, trained 9.7% worse than dense in 60 quickstart steps; 1/3 each, 0.6% better).
        path: ``auto`` (= gather; on CUDA its selected branch runs through the Triton block-sparse
            kernel with per-token selection when ``select_block`` is 16..128), ``gather`` or ``naive``.
    """

    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    n_select: int = 16
    n_local: int = 2
    window: int = 512
    gate_bias: tuple[float, float, float] = (-math.log(2.0),) * 3
    path: str = "auto"

    def __post_init__(self) -> None:
        for name in ("compress_block", "compress_stride", "select_block", "n_select", "n_local", "window"):
            require_positive(getattr(self, name), name)
        require(self.compress_block % self.compress_stride == 0, "compress_stride",
                f"{self.compress_stride} does not divide compress_block={self.compress_block}.")
        require(self.select_block % self.compress_stride == 0, "select_block",
                f"{self.select_block} is not a multiple of compress_stride={self.compress_stride}.")
        require(self.n_select >= self.n_local + 1, "n_select",
                f"{self.n_select} cannot hold the initial block and {self.n_local} local blocks.")
        require(len(self.gate_bias) == 3, "gate_bias", f"needs 3 values (compressed, selected, window), got "
                f"{len(self.gate_bias)}.")
        require(self.path in ("auto", "gather", "naive"), "path", f"unknown path {self.path!r}.",
                "use auto, gather or naive.")

    def tensor_parallel_problem(self) -> str | None:
        return "nsa has per-head parameters (compression and branch gates)"


@register_attention("nsa", NSAOptions)
class NSAAttention(CoreAttention):
    """Native sparse attention with learned compression and gated branches."""

    def __init__(self, ctx: AttentionContext, opts: NSAOptions) -> None:
        super().__init__(ctx, opts)
        require(ctx.model_dim > 0, "model_dim", "NSA gates need the layer input width.")
        self.geo = NSAGeometry(opts.compress_block, opts.compress_stride, opts.select_block, opts.n_select,
                               opts.n_local, opts.window)
        Hkv, D, L = ctx.n_kv_heads, ctx.head_dim, opts.compress_block
        self.scale = 1.0 / math.sqrt(D)
        self.compress_k = nn.Parameter(torch.empty(Hkv, L * D, D))
        self.compress_v = nn.Parameter(torch.empty(Hkv, L * D, D))
        self.pos_k = nn.Parameter(torch.empty(Hkv, L, D))
        self.pos_v = nn.Parameter(torch.empty(Hkv, L, D))
        self.gate = nn.Linear(ctx.model_dim, 3 * ctx.n_heads)
        self.reset_variant_parameters()

    @torch.no_grad()
    def reset_variant_parameters(self) -> None:
        """Compression = mean pooling, no position offsets, gates at sigmoid(gate_bias)."""
        Hkv, D, L = self.ctx.n_kv_heads, self.ctx.head_dim, self.opts.compress_block
        pool = torch.eye(D).repeat(L, 1) / L  # (L*D, D): averages the L token vectors
        self.compress_k.copy_(pool.expand(Hkv, -1, -1))
        self.compress_v.copy_(pool.expand(Hkv, -1, -1))
        self.pos_k.zero_()
        self.pos_v.zero_()
        nn.init.zeros_(self.gate.weight)
        self.gate.bias.copy_(torch.tensor(self.opts.gate_bias, dtype=self.gate.bias.dtype).repeat(self.ctx.n_heads))

    def compress(self, x_BKSD: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, S, D) -> (B, Hkv, nC, D) learned block summaries."""
        B, Hkv, S, D = x_BKSD.shape
        n_c = self.geo.n_compressed(S)
        if n_c == 0:
            return x_BKSD.new_zeros(B, Hkv, 0, D)
        blocks = x_BKSD.unfold(2, self.opts.compress_block, self.opts.compress_stride)  # (B, Hkv, nC, D, L)
        blocks = blocks.transpose(-1, -2) + pos[None, :, None]  # (B, Hkv, nC, L, D)
        return torch.einsum("bkcx,kxd->bkcd", blocks.flatten(-2), weight)

    def set_head_slice(self, start: int, stop: int) -> None:
        """Run query heads [start, stop) (Ulysses): their KV heads' compression, their gates.

        The gates arrive already exchanged in ``batch.head_feats_BHSX`` (see :meth:`head_features`).
        """
        self.kv_slice = gqa_kv_slice(self.ctx, start, stop, "nsa's block selection")

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Three branches per query: compressed keys (S / stride on average / 2), the selected blocks
        and the sliding window, each at most the causal prefix (the compression MLP is not counted)."""
        g, H, D = self.geo, self.ctx.n_heads, self.ctx.head_dim
        cmp = dense_attention_flops(H, D, seq_len, g.n_compressed(seq_len) / 2)
        sel = dense_attention_flops(H, D, seq_len, g.n_select * g.select_block)
        return cmp + sel + dense_attention_flops(H, D, seq_len, g.window)

    def tokens_per_query(self) -> int:
        """Most key tokens one query reads exactly: the union of its selected blocks (the initial and
        local ones among them) and its sliding window (the compressed branch reads summaries)."""
        g = self.geo
        recent = max(g.window, g.n_local * g.select_block)  # local blocks and window overlap
        return recent + (g.n_select - g.n_local) * g.select_block

    def kept_fraction(self, seq_len: int) -> float:
        return budget_kept_fraction(seq_len, self.tokens_per_query())

    def head_features(self, x_BSE: torch.Tensor) -> torch.Tensor:
        """(B, S, H, 3) gate logits of the compressed, selected and window branches."""
        B, S, _ = x_BSE.shape
        return self.gate(x_BSE).view(B, S, self.ctx.n_heads, 3)

    def _compression(self) -> tuple[torch.Tensor, ...]:
        kv = getattr(self, "kv_slice", None)
        params = (self.compress_k, self.pos_k, self.compress_v, self.pos_v)
        return params if kv is None else tuple(p[kv[0] : kv[1]] for p in params)

    def forward(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch):
        B, H, S, _ = q_BHSD.shape
        logits_BHS3 = self.head_features_for(batch, H)
        ck, pk, cv, pv = self._compression()
        k_cmp = self.compress(k_BHSD, ck, pk)
        v_cmp = self.compress(v_BHSD, cv, pv)
        fn = nsa_branches_naive if self.opts.path == "naive" else nsa_branches_gather
        o_cmp, o_slc, o_win = fn(q_BHSD, k_BHSD, v_BHSD, k_cmp, v_cmp, self.geo, self.scale, batch.doc_ids_BS)
        g = torch.sigmoid(logits_BHS3.float()).permute(3, 0, 1, 2)[..., None]  # (3, B, H, S, 1)
        return (g[0] * o_cmp + g[1] * o_slc + g[2] * o_win).to(q_BHSD.dtype)
