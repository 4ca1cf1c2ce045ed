"""Sequence parallelism for linear attention by passing the recurrent state (LASP-style).

Each rank holds one contiguous shard (Ulysses layout) or two (zigzag: chunks r and 2P-1-r, the
ring layout), runs the blocked form on each segment from a zero state, and the ranks exchange
only their segments' final D x D states per head (one all-gather, O(P D^2) bytes instead of O(S)).
Each segment then adds the contribution of the state of everything before it, carried across the
earlier segments in sequence order with their decay and document boundaries. Exact; gradients
flow back through the all-gather to the earlier ranks' keys and values.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from longshard.kernels.lightning.chunk import initial_state_contribution, lightning_attention_chunk
from longshard.models.attention import AttentionBatch, CoreAttention
from longshard.parallel.layout import CommCounter, SequenceParallelCore, shard_segments


class _AllGather(torch.autograd.Function):
    """All-gather whose backward sums each rank's gradient parts with one all-to-all (unlike
    ``torch.distributed.nn.all_gather``, this works on gloo subgroups, e.g. the ring of hybrid)."""

    @staticmethod
    def forward(ctx, x, group: dist.ProcessGroup):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        got = [torch.empty_like(grads[0]) for _ in grads]
        dist.all_to_all(got, [g.contiguous() for g in grads], group=ctx.group)
        return torch.stack(got).sum(0), None


class LinearStateParallel(SequenceParallelCore):
    """Wraps a ``linear`` core attention for sequence shards over ``group``.

    Args:
        inner: the layer's ``linear`` core attention.
        group: the sequence-parallel process group.
        counter: optional communication counter.
        zigzag: shards are zigzag (ring layout) instead of contiguous (Ulysses layout).
    """

    def __init__(self, inner: CoreAttention, group: dist.ProcessGroup, counter: CommCounter | None = None,
                 zigzag: bool = False) -> None:
        super().__init__(inner, group, counter, zigzag)
        self.uses_kv_cache = False

    def forward(self, q_BHSD, k_BHSD, v_BHSD, batch: AttentionBatch):
        self.training_only(batch)
        P, r = self.P, self.rank
        inner = self.inner
        q, k, v = inner.features(q_BHSD, k_BHSD, v_BHSD)
        doc = batch.doc_ids_BS
        L = q.shape[2]
        mine = shard_segments(r, P, L, self.zigzag)
        outs, states_local, ends_local = [], [], []
        for lo, _, n in mine:
            d = None if doc is None else doc[:, lo : lo + n]
            o_seg, st = lightning_attention_chunk(q[:, :, lo : lo + n], k[:, :, lo : lo + n], v[:, :, lo : lo + n],
                                                  inner.log_decay, d, inner.opts.chunk)
            outs.append(o_seg)
            states_local.append(st)
            if d is not None:
                ends_local.append(torch.stack([d[:, 0], d[:, -1]], 1))  # (B, 2): first and last document
        local_state = torch.stack(states_local)  # (M, B, H, D, E): M segments per rank
        states = _AllGather.apply(local_state, self.group)  # differentiable
        if self.counter is not None:
            self.counter.add("all_gather", (P - 1) * local_state.numel() * local_state.element_size())
        if doc is not None:
            ends = torch.stack(ends_local)  # (M, B, 2)
            parts = [torch.empty_like(ends) for _ in range(P)]
            dist.all_gather(parts, ends.contiguous(), group=self.group)
        # Fold every segment of every rank in sequence order into the running state; each of this
        # rank's segments starts from the state of everything before it. Every rank must take part in
        # the all-gather's backward, so the gathered states are always in the graph: the fold starts
        # from 0 * states (no contribution, zero gradient).
        order = sorted((g, j, m, n) for j in range(P)  # (global start, rank, its segment, length)
                       for m, (_, g, n) in enumerate(shard_segments(j, P, L, self.zigzag)))
        a = inner.log_decay.float().to(q.device)[None, :, None, None]
        prefix, prefix_doc = states[0][0] * 0.0, None
        for _, j, m, n_j in order:
            if j == r:  # one of mine: add what came before it
                lo, _, n = mine[m]
                d = None if doc is None else doc[:, lo : lo + n]
                extra, _ = initial_state_contribution(q[:, :, lo : lo + n], inner.log_decay, prefix, d, prefix_doc)
                outs[m] = outs[m] + extra
            carry = torch.exp(-a * n_j)
            if doc is not None:
                first, last = parts[j][m, :, 0], parts[j][m, :, 1]
                same = (first == last) if prefix_doc is None else (first == last) & (first == prefix_doc)
                carry = carry * same[:, None, None, None]
                prefix_doc = last
            prefix = carry * prefix + states[j][m]
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        return inner.finish(o, q_BHSD.dtype)
