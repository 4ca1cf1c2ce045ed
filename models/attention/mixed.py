"""Per-head heterogeneity: one layer whose query heads are split into groups, each its own variant.

E.g. 2 dense heads + 6 S2 heads, or 4 streaming + 4 retrieval heads, computed as one layer with
one output projection. KV heads are split in the same proportion as query heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from longshard.errors import ConfigError, require
from longshard.models.attention.registry import (
    AttentionBatch,
    AttentionContext,
    AttentionOptions,
    CoreAttention,
    append_kv,
    build_attention,
    parse_options,
    register_attention,
)
from torch import nn


@dataclass(kw_only=True)
class MixedOptions(AttentionOptions):
    """Options of ``mixed``.

    Args:
        groups: list of ``{name: VARIANT, heads: N, options: {...}}``; head counts sum to the
            layer's query heads and each group's share of KV heads must be a whole number.
    """

    groups: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(len(self.groups) >= 1, "groups", "needs at least one group.", "e.g. [{name: dense, heads: 2}, ...].")
        for i, g in enumerate(self.groups):
            unknown = set(g) - {"name", "heads", "options"}
            require(not unknown, f"groups[{i}]", f"unknown keys {sorted(unknown)}.", "use name, heads, options.")
            require("name" in g and "heads" in g, f"groups[{i}]", "needs name and heads.")
            require(g["name"] != "mixed", f"groups[{i}].name", "groups cannot nest 'mixed'.")
            require(isinstance(g["heads"], int) and g["heads"] > 0, f"groups[{i}].heads", "must be a positive integer.")

    def tensor_parallel_problem(self) -> str | None:
        for i, g in enumerate(self.groups):  # the first group that cannot be split
            problem = parse_options(g["name"], g.get("options"), f"groups[{i}]").tensor_parallel_problem()
            if problem is not None:
                return f"group {i}: {problem}"
        return None

    def head_parallel_problem(self) -> str | None:
        for i, g in enumerate(self.groups):
            problem = parse_options(g["name"], g.get("options"), f"groups[{i}]").head_parallel_problem()
            if problem is not None:
                return f"group {i}: {problem}"
        return None


@register_attention("mixed", MixedOptions)
class MixedAttention(CoreAttention):
    """Head groups with different attention variants inside one layer.

    When decoding it keeps a cache per group (past keys/values, or the group's own state), so
    recurrent and softmax groups can share a layer.
    """

    uses_kv_cache = False

    def __init__(self, ctx: AttentionContext, opts: MixedOptions) -> None:
        super().__init__(ctx, opts)
        field_name = f"model.attention[{ctx.layer_idx}].options.groups"
        total = sum(g["heads"] for g in opts.groups)
        if total != ctx.n_heads:
            raise ConfigError(field_name, f"group heads sum to {total}, the layer has {ctx.n_heads} query heads.")
        kv_sizes = []
        for i, g in enumerate(opts.groups):
            kv = g["heads"] * ctx.n_kv_heads / ctx.n_heads
            if kv != int(kv) or kv < 1:
                raise ConfigError(f"{field_name}[{i}].heads",
                                  f"{g['heads']} query heads get {kv:g} of the {ctx.n_kv_heads} KV heads.",
                                  "choose group sizes that are multiples of the GQA group size.")
            kv_sizes.append(int(kv))
        self.heads = [g["heads"] for g in opts.groups]
        self.kv_heads = kv_sizes
        sub_ctx = [replace(ctx, n_heads=g["heads"], n_kv_heads=kv, context_covered_elsewhere=True)
                   for g, kv in zip(opts.groups, kv_sizes)]
        self.groups = nn.ModuleList(
            build_attention(g["name"], g.get("options") or {}, c) for g, c in zip(opts.groups, sub_ctx)
        )
        self.covers_context = any(m.covers_context for m in self.groups)
        if not self.covers_context:  # no group reaches all of the context: let each group judge itself
            for g, c in zip(opts.groups, sub_ctx):
                build_attention(g["name"], g.get("options") or {}, replace(c, context_covered_elsewhere=False))

        self.local: list[tuple[int, int]] | None = None  # per group: query heads this rank runs [a, b)

    def attention_flops_per_token(self, seq_len: int) -> float:
        return sum(m.attention_flops_per_token(seq_len) for m in self.groups)

    def kept_fraction(self, seq_len: int) -> float:
        """Head-weighted mean of the groups' kept shares."""
        return sum(m.kept_fraction(seq_len) * h for m, h in zip(self.groups, self.heads)) / sum(self.heads)

    def set_head_slice(self, start: int, stop: int) -> None:
        """Run query heads [start, stop) (Ulysses): each group runs its part of the slice.

        Raises:
            NotImplementedError: a group cannot run a slice of its heads.
        """
        self.local, first = [], 0
        for m, h in zip(self.groups, self.heads):
            a, b = max(start - first, 0), min(stop - first, h)
            if b > a:
                if (a, b) != (0, h):
                    m.set_head_slice(a, b)
                self.local.append((a, b))
            else:
                self.local.append((0, 0))
            first += h

    def head_features(self, x_BSE: torch.Tensor) -> torch.Tensor | None:
        """(B, S, H, X): the groups' features side by side on their heads (zeros for groups without).

        Raises:
            ValueError: two groups have features of different widths.
        """
        feats = [m.head_features(x_BSE) for m in self.groups]
        widths = {f.shape[-1] for f in feats if f is not None}
        if not widths:
            return None
        if len(widths) > 1:
            raise ValueError(f"mixed: groups with head features of different widths {sorted(widths)}")
        B, S, _ = x_BSE.shape
        F = widths.pop()
        return torch.cat([x_BSE.new_zeros(B, S, h, F) if f is None else f for f, h in zip(feats, self.heads)], dim=2)

    def forward(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch):
        heads = self.heads if self.local is None else [b - a for a, b in self.local]
        # KV heads in proportion to query heads (Ulysses may have replicated KV heads)
        kv_heads = [h * k_BHSD.shape[1] // q_BHSD.shape[1] for h in heads]
        qs = q_BHSD.split(heads, dim=1)
        ks = k_BHSD.split(kv_heads, dim=1)
        vs = v_BHSD.split(kv_heads, dim=1)
        feats = batch.head_feats_BHSX  # exchanged by a head-parallel wrapper; else groups use x_BSE
        fs = feats.split(heads, dim=1) if feats is not None else [None] * len(heads)
        outs = []
        for i, (m, q, k, v, f) in enumerate(zip(self.groups, qs, ks, vs, fs)):
            if q.shape[1] == 0:
                continue
            sub = batch if f is None else replace(batch, head_feats_BHSX=f)
            if batch.cache_slot is not None:
                slot = batch.cache_slot.setdefault(f"group{i}", {})
                if m.uses_kv_cache:
                    k, v = append_kv(slot, k, v)
                    sub = replace(sub, cache_slot=None)
                else:
                    sub = replace(sub, cache_slot=slot)
            outs.append(m(q, k, v, sub))
        out = torch.cat(outs, dim=1)
        idle = [p for m, q in zip(self.groups, qs) if q.shape[1] == 0 for p in m.parameters()]
        if idle:  # groups with no head on this rank: zero gradients, so data parallel sees every parameter
            out = out + 0.0 * sum(p.flatten()[0] for p in idle)
        return out

