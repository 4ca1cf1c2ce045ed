"""Sequence layouts and what every sequence-parallel core shares.

* Layouts: contiguous shards (Ulysses: rank r holds tokens [rS/P, (r+1)S/P)) and zigzag shards
  (ring, hybrid: rank r holds chunks r and 2P-1-r of 2P, so causal work is balanced);
  :func:`shard_batch` cuts a batch, positions computed on the whole sequence first; :class:`SeqShard`
  is a rank's place in its group.
* :class:`CommCounter`: bytes and calls per collective of this rank's wrappers.
* :class:`SequenceParallelCore`: the base of every sequence-parallel wrapper (Ulysses, ring, the
  sparsity-aware exchange, linear state passing): it owns the inner core, the group, the counter,
  the training-only guard and the all-gather of document ids.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from longshard.errors import require
from longshard.models.attention import AttentionBatch, CoreAttention
from longshard.models.model import positions_from_docs


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


def dense_ring_bytes(batch: int, local_len: int, n_kv_heads: int, head_dim: int, degree: int,
                     element_size: int) -> int:
    """Bytes one rank of a dense zigzag ring sends per forward + backward of one layer
    (:class:`~longshard.parallel.ring.RingAttention`): K and V pass ``degree - 1`` hops forward and
    again in backward, where their fp32 gradient accumulators travel with them and then home
    (``degree`` hops).

    Args:
        batch: sequences per micro-batch.
        local_len: tokens this rank holds (seq_len / degree).
        n_kv_heads: KV heads this rank runs.
        head_dim: per-head width.
        degree: ranks in the ring.
        element_size: bytes per K/V element (2 for bf16, 4 for fp32).
    """
    if degree <= 1:
        return 0
    n = batch * n_kv_heads * local_len * head_dim
    return 2 * (degree - 1) * 2 * n * element_size + 2 * degree * n * 4


class SequenceParallelCore(CoreAttention):
    """Base of the sequence-parallel wrappers of a layer's core attention.

    Args:
        inner: the core it makes sequence-parallel (kept as a submodule: its parameters train as before).
        group: the sequence-parallel process group.
        counter: optional communication counter.
        zigzag: the ranks hold zigzag shards (ring layout) instead of contiguous ones.
    """

    def __init__(self, inner: CoreAttention, group: dist.ProcessGroup, counter: CommCounter | None = None,
                 zigzag: bool = False) -> None:
        super().__init__(inner.ctx, inner.opts)
        self.inner, self.group, self.counter, self.zigzag = inner, group, counter, zigzag
        self.P, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.uses_kv_cache = inner.uses_kv_cache

    @property
    def softmax_scale(self) -> float:
        return self.inner.softmax_scale

    @staticmethod
    def training_only(batch: AttentionBatch) -> None:
        """Sequence-parallel attention trains and evaluates full sequences; decoding runs on one device."""
        if batch.cache_slot is not None:
            raise ValueError("sequence-parallel attention is for training; decode on one device")

    def gather_doc_ids(self, doc_ids_BL: torch.Tensor | None) -> torch.Tensor | None:
        """(P, B, L): every rank's document ids in its own layout (no gradient; one int per token), or None."""
        if doc_ids_BL is None:
            return None
        parts = [torch.empty_like(doc_ids_BL) for _ in range(self.P)]
        dist.all_gather(parts, doc_ids_BL.contiguous(), group=self.group)
        return torch.stack(parts)

    def global_doc_ids(self, doc_ids_BL: torch.Tensor | None) -> torch.Tensor | None:
        """(B, S): the document id of every position of the whole sequence (gathered, put in order)."""
        parts = self.gather_doc_ids(doc_ids_BL)
        if parts is None:
            return None
        P, B, L = parts.shape
        if not self.zigzag:
            return parts.permute(1, 0, 2).reshape(B, P * L)
        out = torch.empty(B, P * L, dtype=parts.dtype, device=parts.device)
        for r in range(P):
            out[:, zigzag_positions(r, P, L, parts.device)] = parts[r]
        return out


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
