"""Ulysses sequence parallelism (DeepSpeed-Ulysses), applied to a single-device model from outside.

Each rank holds S/P tokens; around the core attention an all-to-all turns the sequence shard into a
head shard (all S tokens, H/P heads), the unchanged core attention runs on its heads, and a second
all-to-all turns the result back. KV heads fewer than P are replicated so each rank gets the KV head
of its query heads. ``linear`` layers pass their recurrent states instead
(:mod:`longshard.parallel.linear_state`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from longshard.errors import ConfigError, require
from longshard.models.attention import AttentionBatch, CoreAttention
from longshard.models.model import Transformer
from longshard.parallel.layout import CommCounter, SequenceParallelCore, zigzag_positions
from longshard.parallel.linear_state import LinearStateParallel


def _exchange(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    P = dist.get_world_size(group)
    parts = [t.contiguous() for t in x.chunk(P, dim=scatter_dim)]
    out = [torch.empty_like(parts[0]) for _ in range(P)]
    dist.all_to_all(out, parts, group=group)
    return torch.cat(out, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """All-to-all whose backward is the inverse all-to-all (works on gloo subgroups)."""

    @staticmethod
    def forward(ctx, x, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _exchange(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _exchange(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


def _a2a(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup,
         counter: CommCounter | None) -> torch.Tensor:
    """Differentiable all-to-all: split ``scatter_dim`` in P parts, part p to rank p, concat on ``gather_dim``."""
    P = dist.get_world_size(group)
    if counter is not None:  # bytes leaving this rank (its own part stays)
        counter.add("all_to_all", (P - 1) * (x.numel() // P) * x.element_size())
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


class UlyssesAttention(SequenceParallelCore):
    """Wraps a core attention: sequence shard -> head shard -> attention -> back.

    Args:
        inner: the layer's core attention, restricted to this rank's heads.
        group: the sequence-parallel process group.
        kv_repeat: how many times each KV head is replicated so KV heads split over P ranks.
        counter: optional communication counter.
        zigzag: the ranks hold zigzag shards (chunks r and 2P-1-r, e.g. Megatron's context-parallel
            layout) instead of contiguous ones; the gathered sequence is put in order around the
            inner attention.
    """

    def __init__(self, inner: CoreAttention, group: dist.ProcessGroup, kv_repeat: int,
                 counter: CommCounter | None = None, zigzag: bool = False) -> None:
        super().__init__(inner, group, counter, zigzag)
        self.kv_repeat = kv_repeat

    def _order(self, L: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(gathered -> global, global -> gathered) index maps of the zigzag layout."""
        pos = torch.cat([zigzag_positions(r, self.P, L, device) for r in range(self.P)])  # global position of i
        return pos, torch.argsort(pos)

    def forward(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch):
        self.training_only(batch)
        if self.kv_repeat > 1:
            k_BHSD = k_BHSD.repeat_interleave(self.kv_repeat, dim=1)
            v_BHSD = v_BHSD.repeat_interleave(self.kv_repeat, dim=1)
        q, k, v = (_a2a(t, 1, 2, self.group, self.counter) for t in (q_BHSD, k_BHSD, v_BHSD))
        feats = None
        if batch.x_BSE is not None:  # input-dependent gates: computed on this shard, exchanged like q
            f_BSHX = self.inner.head_features(batch.x_BSE)
            if f_BSHX is not None:
                feats = _a2a(f_BSHX.transpose(1, 2), 1, 2, self.group, self.counter)
        doc = self.global_doc_ids(batch.doc_ids_BS)  # in sequence order
        if self.zigzag:
            to_gathered, to_global = self._order(q_BHSD.shape[2], q.device)
            q, k, v = (t.index_select(2, to_global) for t in (q, k, v))
            feats = None if feats is None else feats.index_select(2, to_global)
        o = self.inner(q, k, v, replace(batch, doc_ids_BS=doc, x_BSE=None, head_feats_BHSX=feats))
        if self.zigzag:
            o = o.index_select(2, to_gathered)
        if feats is not None:  # zero-valued on purpose: every rank must run the features' all-to-all backward
            o = o + 0.0 * feats.sum()  # even when its heads ignore them (a mixed layer whose gated group is elsewhere)
        return _a2a(o, 2, 1, self.group, self.counter)


def kv_replication(n_heads: int, n_kv_heads: int, P: int) -> int:
    """How often each KV head is repeated so query and KV heads both split over P ranks.

    Raises:
        ConfigError: query heads not divisible by P, or KV heads neither divisible by P nor dividing it.
    """
    require(n_heads % P == 0, "parallel.sp_degree",
            f"{n_heads} query heads do not split over {P} Ulysses ranks (Ulysses shards heads).",
            "choose a Ulysses degree dividing the query heads.")
    if n_kv_heads % P == 0:
        return 1
    if P % n_kv_heads == 0:
        return P // n_kv_heads
    raise ConfigError("parallel.sp_degree", f"{n_kv_heads} KV heads can neither be split over nor replicated "
                      f"to {P} Ulysses ranks.", "choose a Ulysses degree dividing or divisible by n_kv_heads.")


def apply_ulysses(model: Transformer, group: dist.ProcessGroup, counter: CommCounter | None = None) -> Transformer:
    """Put every layer's core attention behind an all-to-all over ``group`` (in place).

    ``linear`` layers instead exchange their recurrent states (:mod:`longshard.parallel.linear_state`).

    Raises:
        ConfigError: query heads not divisible by P, or KV heads neither divisible by P nor
            dividing it, or a variant that cannot run on a slice of its heads.
    """
    P, r = dist.get_world_size(group), dist.get_rank(group)
    for layer in model.layers:
        attn = layer.attention
        kv_repeat = kv_replication(attn.n_heads, attn.n_kv_heads, P)
        H = attn.n_heads
        core = attn.core_attention
        if core.cp_form == "state":  # recurrent: pass D x D states, not activations
            attn.core_attention = LinearStateParallel(core, group, counter)
            continue
        off = attn.head_offset  # tensor parallel: this rank's heads start here
        try:
            core.set_head_slice(off + r * H // P, off + (r + 1) * H // P)
        except NotImplementedError as e:
            raise ConfigError("parallel.sp_mode", f"ulysses: {e}.", "use another variant or sp_degree=1.") from None
        attn.core_attention = UlyssesAttention(core, group, kv_repeat, counter)
    return model
