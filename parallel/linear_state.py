"""Sequence parallelism for linear attention by passing the recurrent state (LASP-style).

Each rank holds a contiguous shard, runs the blocked form on it from a zero state, and the ranks
exchange only their final D x D states per head (an all-gather, O(P D^2) bytes instead of O(S)).
Rank r then adds the contribution of the state of everything before it, carried across earlier
shards with their decay and document boundaries. Exact; gradients flow back through the
all-gather to the earlier ranks' keys and values.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from longshard.kernels.lightning.chunk import initial_state_contribution, lightning_attention_chunk
from longshard.models.attention import AttentionBatch, CoreAttention
from longshard.parallel.sequence import CommCounter
from torch.distributed.nn.functional import all_gather


class LinearStateParallel(CoreAttention):
    """Wraps a ``linear`` core attention for contiguous sequence shards over ``group``."""

    def __init__(self, inner: CoreAttention, group: dist.ProcessGroup, counter: CommCounter | None = None) -> None:
        super().__init__(inner.ctx)
        self.inner, self.group, self.counter = inner, group, counter
        self.uses_kv_cache = False

    def forward(self, q_BHSD, k_BHSD, v_BHSD, batch: AttentionBatch):
        if batch.cache_slot is not None:
            raise ValueError("sequence-parallel attention is for training; decode on one device")
        P, r = dist.get_world_size(self.group), dist.get_rank(self.group)
        inner = self.inner
        q, k, v = inner.features(q_BHSD, k_BHSD, v_BHSD)
        doc = batch.doc_ids_BS
        o, local_state = lightning_attention_chunk(q, k, v, inner.log_decay, doc, inner.opts.chunk)
        states = all_gather(local_state.contiguous(), group=self.group)  # differentiable
        if self.counter is not None:
            self.counter.add("all_gather", (P - 1) * local_state.numel() * local_state.element_size())
        L = q.shape[2]
        lam_L = torch.exp(-inner.log_decay.float().to(q.device) * L)[None, :, None, None]
        if doc is not None:
            ends = torch.stack([doc[:, 0], doc[:, -1]], 1)  # (B, 2): first and last document of this shard
            parts = [torch.empty_like(ends) for _ in range(P)]
            dist.all_gather(parts, ends.contiguous(), group=self.group)
        # Every rank must take part in the all-gather's backward, so the gathered states are always in
        # the graph: rank 0 starts from 0 * states[0] (no contribution, zero gradient).
        prefix = states[0] * 0.0
        prefix_doc = None
        for j in range(r):  # the state at the end of shard j, from every shard before it
            carry = lam_L
            if doc is not None:
                first, last = parts[j][:, 0], parts[j][:, 1]
                same = (first == last) if prefix_doc is None else (first == last) & (first == prefix_doc)
                carry = carry * same[:, None, None, None]
                prefix_doc = last
            prefix = carry * prefix + states[j]
        extra, _ = initial_state_contribution(q, inner.log_decay, prefix, doc, prefix_doc)
        o = o + extra
        return inner.finish(o, q_BHSD.dtype)
