"""Mixture-of-Head attention (MoH): heads as experts.

Shared heads run for every token; each token runs its top-k routed heads (router over the layer
input, renormalised over the chosen heads); the head outputs are weighted per token, the shared and
routed groups by ``2 softmax(W0 x)``, before the output projection, and a load-balance loss keeps the
routed heads in use (see :mod:`longshard.kernels.moh`): the definitions of the reference code
(SkyworkAI/MoH), checked against it in the tests. The ``routed`` path computes only the
(token, head) pairs used, so attention FLOPs fall with the share of active heads.

Ulysses: the routing of a token needs every head, so each rank routes its own sequence shard (all
heads known there) and exchanges, per head, the gate, the choice and the router probability like a
query; each rank then runs its heads over the whole sequence and its share of the load-balance loss
(exact: f and P of a head are means over every token, and the heads' shares add up). No ring (a
head's queries would be spread over ranks), no tensor parallelism (router parameters over all heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from longshard.errors import require
from longshard.kernels.moh import (
    MoHGates,
    balance_loss,
    moh_attention_all_heads,
    moh_attention_naive,
    moh_attention_routed,
    moh_gates,
)
from longshard.models.attention.registry import (
    AttentionBatch,
    AttentionContext,
    AttentionOptions,
    CoreAttention,
    dense_attention_flops,
    register_attention,
)
from torch import nn


@dataclass(kw_only=True)
class MoHOptions(AttentionOptions):
    """Options of ``moh``.

    Args:
        shared_heads: heads every token runs (the first ones).
        top_k: routed heads each token runs (of the remaining heads).
        balance_coef: weight of the load-balance loss (added to the training loss); the loss is in the
            reference's units (``top_k`` when balanced; before 2026-12 longshard's was that / ``top_k``, so an
            old ``balance_coef`` c is c / top_k now).
        router_std: standard deviation of the routers' initial weights; 0 makes a converted dense
            checkpoint compute its own heads unchanged at step 0 (only the routed heads not chosen drop).
        path: ``auto`` (``routed`` from ``routed_min_len`` tokens on, else ``all_heads``), ``routed`` (only
            the used (token, head) pairs), ``all_heads`` (every head in one flash call, then gated, as the
            reference computes) or ``naive`` (the explicit-softmax specification).
        routed_min_len: sequence length from which ``auto`` runs ``routed``; None (the default): never. On
            CPU the routed path's training step measured 1.08-1.09x the all-heads one at 1K and 4K
            (tiny_lm, benchmarks/RESULTS.md): PyTorch's masked flash attention reads every key of a chunk,
            so gathering the chosen tokens saves less than it costs. Not yet measured on a GPU.
    """

    shared_heads: int = 2
    top_k: int = 2
    balance_coef: float = 0.01
    router_std: float = 0.02
    path: str = "auto"
    routed_min_len: int | None = None

    def __post_init__(self) -> None:
        require(self.shared_heads >= 0, "shared_heads", f"must be >= 0, got {self.shared_heads}.")
        require(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}.")
        require(self.balance_coef >= 0, "balance_coef", "must be >= 0.")
        require(self.router_std >= 0, "router_std", "must be >= 0.")
        require(self.path in ("auto", "routed", "all_heads", "naive"), "path", f"unknown path {self.path!r}.",
                "use auto, routed, all_heads or naive.")
        require(self.routed_min_len is None or self.routed_min_len >= 0, "routed_min_len",
                f"must be >= 0 or null, got {self.routed_min_len}.")

    def tensor_parallel_problem(self) -> str | None:
        return "moh has router parameters over all heads"


@register_attention("moh", MoHOptions)
class MoHAttention(CoreAttention):
    """Mixture-of-Head attention: shared heads plus per-token top-k routed heads, weighted outputs."""

    def __init__(self, ctx: AttentionContext, opts: MoHOptions) -> None:
        super().__init__(ctx, opts)
        field = f"model.attention[{ctx.layer_idx}].options"
        routed = ctx.n_heads - opts.shared_heads
        require(0 <= routed and opts.shared_heads + routed > 0, f"{field}.shared_heads",
                f"{opts.shared_heads} shared heads, but the layer has {ctx.n_heads}.", "use at most the layer's heads.")
        require(opts.top_k <= routed and (routed == 0 or opts.top_k >= 1), f"{field}.top_k",
                f"top_k={opts.top_k} of {routed} routed heads.", f"choose 1..{routed}." if routed else "use 0.")
        require(ctx.model_dim > 0, "model_dim", "MoH's routers need the layer input width.")
        self.scale = 1.0 / math.sqrt(ctx.head_dim)
        self.w_shared = nn.Parameter(torch.empty(opts.shared_heads, ctx.model_dim))
        self.w_routed = nn.Parameter(torch.empty(routed, ctx.model_dim))
        both = opts.shared_heads > 0 and routed > 0  # a lone group has no group weights (as the reference)
        self.w_mix = nn.Parameter(torch.empty(2, ctx.model_dim)) if both else None
        self.head_slice: tuple[int, int] | None = None
        self.reset_variant_parameters()

    @torch.no_grad()
    def reset_variant_parameters(self) -> None:
        """Routers ~ N(0, router_std^2); the group weights start equal (W0 = 0: alpha = 1, 1)."""
        self.w_shared.normal_(0.0, self.opts.router_std)
        self.w_routed.normal_(0.0, self.opts.router_std)
        if self.w_mix is not None:
            self.w_mix.zero_()

    @property
    def active_heads(self) -> int:
        """Heads each token runs."""
        return self.opts.shared_heads + self.opts.top_k

    def set_head_slice(self, start: int, stop: int) -> None:
        """Run heads [start, stop) (Ulysses); their gates arrive as exchanged head features."""
        self.head_slice = (start, stop)

    def head_features(self, x_BSE: torch.Tensor) -> torch.Tensor:
        """(B, S, H, 3) per head: its gate, whether the token runs it (1.0 / 0.0; shared heads 1) and its
        router probability (0 for shared heads), fp32, from this sequence shard's input."""
        gates = moh_gates(x_BSE, self.w_shared, self.w_routed, self.w_mix, self.opts.top_k)
        Hs = self.opts.shared_heads
        runs = torch.cat([gates.g_BSH.new_ones(*gates.g_BSH.shape[:-1], Hs), gates.chosen_BSR.float()], dim=-1)
        probs = gates.g_BSH.new_zeros(*gates.g_BSH.shape[:-1], Hs)
        if gates.probs_BSR is not None:
            probs = torch.cat([probs, gates.probs_BSR], dim=-1)
        return torch.stack([gates.g_BSH, runs, probs], dim=-1)

    def _slice_gates(self, feats_BHSX: torch.Tensor) -> MoHGates:
        """The gates of this rank's heads (over every token) from the exchanged features, and its share
        of the load-balance loss scaled by the number of slices (the ranks' mean is the whole loss)."""
        start, stop = self.head_slice
        n_shared = max(0, min(stop, self.opts.shared_heads) - start)  # shared heads come first
        g_BSH = feats_BHSX[..., 0].transpose(1, 2)
        chosen_BSR = feats_BHSX[:, n_shared:, :, 1].transpose(1, 2) > 0.5
        balance = 0.0 * feats_BHSX[..., 2].sum()  # connected even without routed heads here: the features'
        routed = self.ctx.n_heads - self.opts.shared_heads  # all-to-all backward runs on every rank
        if chosen_BSR.shape[-1]:
            probs_BSR = feats_BHSX[:, n_shared:, :, 2].transpose(1, 2)
            share = balance_loss(chosen_BSR, probs_BSR, self.opts.top_k, routed)
            balance = balance + share * (self.ctx.n_heads / (stop - start))
        return MoHGates(g_BSH, chosen_BSR, balance)

    def forward(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch):
        if self.head_slice is not None:
            if batch.head_feats_BHSX is None:
                raise ValueError("moh on a slice of its heads needs their exchanged gates (head_feats_BHSX)")
            gates = self._slice_gates(batch.head_feats_BHSX)
        elif batch.x_BSE is None:
            raise ValueError("moh routes on the layer input: pass AttentionBatch.x_BSE")
        else:
            gates = moh_gates(batch.x_BSE, self.w_shared, self.w_routed, self.w_mix, self.opts.top_k)
        self.last_aux_loss = self.opts.balance_coef * gates.balance  # Transformer.aux_loss() adds it
        fn = {"naive": moh_attention_naive, "routed": moh_attention_routed,
              "all_heads": moh_attention_all_heads}[self.resolve_path(q_BHSD.shape[2])]
        return fn(q_BHSD, k_BHSD, v_BHSD, gates, self.scale, batch.doc_ids_BS)

    def resolve_path(self, seq_len: int) -> str:
        """The path ``auto`` stands for at this sequence length."""
        if self.opts.path != "auto":
            return self.opts.path
        min_len = self.opts.routed_min_len
        return "routed" if min_len is not None and seq_len >= min_len else "all_heads"

    def kept_fraction(self, seq_len: int) -> float:
        """Share of the (token, head) pairs the model uses (what the ``routed`` path computes; every key of a
        used pair is read)."""
        return self.active_heads / self.ctx.n_heads

    def attention_flops_per_token(self, seq_len: int) -> float:
        """The active heads' causal attention, plus the routers (2 FLOPs per weight)."""
        routers = 2.0 * self.ctx.model_dim * (self.ctx.n_heads + 2)
        return dense_attention_flops(self.active_heads, self.ctx.head_dim, seq_len) + routers
