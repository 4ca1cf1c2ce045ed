"""Sequence (context) parallelism applied to a single-device model from outside (see also ``ring.py``).

``ulysses`` (DeepSpeed-Ulysses): each rank holds S/P tokens; around the core attention an
all-to-all turns the sequence shard into a head shard (all S tokens, H/P heads), the unchanged
core attention runs on its heads, and a second all-to-all turns the result back. KV heads fewer
than P are replicated so each rank gets the KV head of its query heads.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from longshard.errors import ConfigError, require
from longshard.models.attention import AttentionBatch, CoreAttention
from longshard.models.model import Transformer, positions_from_docs
from torch import nn


@dataclass
class CommCounter:
    """Bytes and calls per collective, counted by the sequence-parallel layers of this rank."""

    bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, op: str, nbytes: int) -> None:
        self.bytes[op] += nbytes
        self.calls[op] += 1

    def reset(self) -> dict[str, int]:
        """Return {op_bytes, op_calls} so far and start again."""
        out = {f"{k}_bytes": v for k, v in self.bytes.items()} | {f"{k}_calls": v for k, v in self.calls.items()}
        self.bytes.clear()
        self.calls.clear()
        return out


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


class UlyssesAttention(nn.Module):
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
        super().__init__()
        self.inner, self.group, self.kv_repeat, self.counter = inner, group, kv_repeat, counter
        self.uses_kv_cache = inner.uses_kv_cache
        self.zigzag = zigzag

    def _order(self, L: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(gathered -> global, global -> gathered) index maps of the zigzag layout."""
        P = dist.get_world_size(self.group)
        pos = torch.cat([zigzag_positions(r, P, L, device) for r in range(P)])  # global position of gathered i
        return pos, torch.argsort(pos)

    def forward(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch):
        if batch.cache_slot is not None:
            raise ValueError("sequence-parallel attention is for training; decode on one device")
        if self.kv_repeat > 1:
            k_BHSD = k_BHSD.repeat_interleave(self.kv_repeat, dim=1)
            v_BHSD = v_BHSD.repeat_interleave(self.kv_repeat, dim=1)
        q, k, v = (_a2a(t, 1, 2, self.group, self.counter) for t in (q_BHSD, k_BHSD, v_BHSD))
        feats = None
        if batch.x_BSE is not None:  # input-dependent gates: computed on this shard, exchanged like q
            f_BSHF = self.inner.head_features(batch.x_BSE)
            if f_BSHF is not None:
                feats = _a2a(f_BSHF.transpose(1, 2), 1, 2, self.group, self.counter)
        doc = batch.doc_ids_BS
        if doc is not None:  # no gradient: a plain all-gather of the (small) document ids
            P = dist.get_world_size(self.group)
            parts = [torch.empty_like(doc) for _ in range(P)]
            dist.all_gather(parts, doc.contiguous(), group=self.group)
            doc = torch.cat(parts, dim=1)
        if self.zigzag:
            to_gathered, to_global = self._order(q_BHSD.shape[2], q.device)
            q, k, v = (t.index_select(2, to_global) for t in (q, k, v))
            feats = None if feats is None else feats.index_select(2, to_global)
            doc = None if doc is None else doc.index_select(1, to_global)
        o = self.inner(q, k, v, replace(batch, doc_ids_BS=doc, x_BSE=None, head_feats_BHSF=feats))
        if self.zigzag:
            o = o.index_select(2, to_gathered)
        if feats is not None:  # every rank must run the features' all-to-all backward, even if its heads
            o = o + 0.0 * feats.sum()  # ignore them (a mixed layer whose gated group lives on other ranks)
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
        if core.context_parallel_core()[0] == "state":  # recurrent: pass D x D states, not activations
            from longshard.parallel.linear_state import LinearStateParallel

            attn.core_attention = LinearStateParallel(core, group, counter)
            continue
        off = attn.head_offset  # tensor parallel: this rank's heads start here
        try:
            core.set_head_slice(off + r * H // P, off + (r + 1) * H // P)
        except NotImplementedError as e:
            raise ConfigError("parallel.sp_mode", f"ulysses: {e}.", "use another variant or sp_degree=1.") from None
        attn.core_attention = UlyssesAttention(core, group, kv_repeat, counter)
    return model


def shard_segments(rank: int, degree: int, local_len: int, zigzag: bool) -> list[tuple[int, int, int]]:
    """Contiguous pieces of rank ``rank``'s ``local_len`` tokens: (local start, global start, length),
    in local order. Contiguous sharding: one piece; zigzag: chunks ``rank`` and ``2*degree-1-rank``
    of 2*degree equal chunks."""
    if not zigzag:
        return [(0, rank * local_len, local_len)]
    c = local_len // 2
    return [(0, rank * c, c), (c, (2 * degree - 1 - rank) * c, c)]


def zigzag_positions(rank: int, degree: int, local_len: int, device=None) -> torch.Tensor:
    """Global positions of the ``local_len`` tokens rank ``rank`` holds under zigzag sharding
    (chunks ``rank`` and ``2*degree-1-rank`` of 2*degree equal chunks)."""
    pieces = shard_segments(rank, degree, local_len, zigzag=True)
    return torch.cat([torch.arange(g, g + n, device=device) for _, g, n in pieces])


@dataclass(frozen=True)
class SeqShard:
    """This rank's place in its sequence-parallel group, for sharding inputs and reducing metrics."""

    group: dist.ProcessGroup
    rank: int
    degree: int
    zigzag: bool = False
    inner: int = 1

    def shard(self, tokens_BS, labels_BS, doc_ids_BS):
        return shard_batch(tokens_BS, labels_BS, doc_ids_BS, self.rank, self.degree, self.zigzag, self.inner)


def shard_batch(
    tokens_BS: torch.Tensor, labels_BS: torch.Tensor, doc_ids_BS: torch.Tensor | None, rank: int, degree: int,
    zigzag: bool = False,
    inner: int = 1,
) -> dict[str, torch.Tensor | None]:
    """This rank's sequence shard, with positions computed on the whole sequence first.

    Contiguous (Ulysses) or zigzag (ring: chunks ``rank`` and ``2*degree-1-rank`` of 2*degree).
    With ``inner > 1`` (hybrid): zigzag over the ``degree // inner`` ring ranks, then contiguous
    pieces of each ring shard over the ``inner`` Ulysses ranks (``rank = ring_rank * inner + i``).

    Raises:
        ConfigError: the sequence length is not divisible by ``degree`` (``2*degree`` for zigzag).
    """
    S = tokens_BS.shape[1]
    need = 2 * degree if zigzag else degree
    require(S % need == 0, "train.seq_len", f"{S} is not divisible by {need} (parallel.sp_degree={degree}"
            f"{', zigzag' if zigzag else ''}).", f"choose seq_len as a multiple of {need}.")
    pos = positions_from_docs(doc_ids_BS) if doc_ids_BS is not None else torch.arange(S).expand_as(tokens_BS)
    if zigzag:
        ring = degree // inner
        shard = zigzag_positions(rank // inner, ring, S // ring)
        piece = len(shard) // inner
        sl = shard[(rank % inner) * piece : (rank % inner + 1) * piece]
    else:
        sl = slice(rank * S // degree, (rank + 1) * S // degree)
    return {
        "tokens": tokens_BS[:, sl],
        "labels": labels_BS[:, sl],
        "doc_ids": None if doc_ids_BS is None else doc_ids_BS[:, sl],
        "position_ids": pos[:, sl].contiguous(),
    }
