"""Sparsity-aware context parallelism for block-sparse attention (S2, streaming heads, sliding window).

A dense ring moves every rank's K/V to every other rank. With a block-sparse pattern most of
those blocks are never read: a sliding window needs only the neighbouring blocks, an S2 head
only its strided shard. Here every rank works out, from the pattern alone (no communication),
exactly which (KV head, key block) pairs each peer's local queries read from it, and sends only
those with one ``batch_isend_irecv`` exchange; the backward sends their gradients back to the
owners. Sharding is the ring's zigzag (rank r holds chunks r and 2P-1-r), so causal work stays
balanced. Each rank then attends its local queries to its own tokens plus the received blocks,
with the pattern's token-level mask on global positions, chunk by chunk through the fused kernels of
:mod:`longshard.kernels.block_sparse.gathered` (exact; memory linear in the local length).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from longshard.errors import ConfigError
from longshard.kernels.block_sparse.gathered import BufferLayout, gathered_block_attention
from longshard.kernels.block_sparse.pattern import SparsePattern
from longshard.models.attention import AttentionBatch, CoreAttention
from longshard.parallel.layout import CommCounter, SequenceParallelCore, dense_ring_bytes, zigzag_positions


def owned_blocks(rank: int, degree: int, n_blocks: int) -> torch.Tensor:
    """Global block indices rank ``rank`` holds under zigzag sharding, in its local order."""
    per_chunk = n_blocks // (2 * degree)
    first = torch.arange(rank * per_chunk, (rank + 1) * per_chunk)
    second = torch.arange((2 * degree - 1 - rank) * per_chunk, (2 * degree - rank) * per_chunk)
    return torch.cat([first, second])


def exchange_plan(pattern: SparsePattern, n_kv_heads: int, degree: int) -> list[list[torch.Tensor]]:
    """``plan[q][s]``: (n, 2) long rows (KV head, global key block) that rank q's queries read from
    rank s (s != q), sorted; empty for s == q. Derived from the pattern only, so every rank agrees.

    A pair is needed when some query head of that KV group keeps the key block for some query
    block rank q holds (causal blocks only).
    """
    H, n, _ = pattern.block_mask_HQN.shape
    G = H // n_kv_heads
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    kv_mask = (pattern.block_mask_HQN.cpu() & causal).view(n_kv_heads, G, n, n).any(1)  # (Hkv, nQ, nK)
    owned = [owned_blocks(r, degree, n) for r in range(degree)]
    plan = []
    for q in range(degree):
        reads = kv_mask[:, owned[q]].any(1)  # (Hkv, nK): key blocks any local query block reads
        row = []
        for s in range(degree):
            if s == q:
                row.append(torch.empty(0, 2, dtype=torch.long))
                continue
            sel = torch.zeros(n, dtype=torch.bool)
            sel[owned[s]] = True
            g, j = (reads & sel).nonzero(as_tuple=True)
            row.append(torch.stack([g, j], 1))
        plan.append(row)
    return plan


class _Exchange(torch.autograd.Function):
    """Send the planned K/V blocks to the ranks that read them; backward returns their gradients."""

    @staticmethod
    def forward(ctx, k_blocks, v_blocks, send_idx, recv_counts, group, counter):
        # k_blocks, v_blocks: (B, Hkv, nb_local, block, D); send_idx[s]: (n, 2) (KV head, local block)
        P, me = dist.get_world_size(group), dist.get_rank(group)
        B, _, _, blk, D = k_blocks.shape
        kv = torch.stack([k_blocks, v_blocks])  # (2, B, Hkv, nb, blk, D)
        ops, recv = [], []
        for s in range(P):
            if s == me:
                recv.append(kv.new_empty(2, B, 0, blk, D))
                continue
            idx = send_idx[s]
            if len(idx):
                out = kv[:, :, idx[:, 0], idx[:, 1]].contiguous()  # (2, B, n, blk, D)
                ops.append(dist.P2POp(dist.isend, out, dist.get_global_rank(group, s), group))
                if counter is not None:
                    counter.add("sparse_kv", out.numel() * out.element_size())
            buf = kv.new_empty(2, B, recv_counts[s], blk, D)
            if recv_counts[s]:
                ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(group, s), group))
            recv.append(buf)
        if ops:
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        ctx.meta = (send_idx, recv_counts, group, counter, kv.shape)
        got = torch.cat(recv, dim=2)  # (2, B, n_recv, blk, D) in source-rank order
        return got[0], got[1]

    @staticmethod
    def backward(ctx, grad_k, grad_v):
        send_idx, recv_counts, group, counter, kv_shape = ctx.meta
        P, me = dist.get_world_size(group), dist.get_rank(group)
        grads = torch.stack([grad_k, grad_v]).contiguous()
        offsets = [0]
        for c in recv_counts:
            offsets.append(offsets[-1] + c)
        ops, back = [], {}
        for s in range(P):
            if s == me:
                continue
            if recv_counts[s]:
                part = grads[:, :, offsets[s] : offsets[s + 1]].contiguous()
                ops.append(dist.P2POp(dist.isend, part, dist.get_global_rank(group, s), group))
                if counter is not None:
                    counter.add("sparse_kv", part.numel() * part.element_size())
            if len(send_idx[s]):
                back[s] = grads.new_empty(2, kv_shape[1], len(send_idx[s]), *kv_shape[4:])
                ops.append(dist.P2POp(dist.irecv, back[s], dist.get_global_rank(group, s), group))
        if ops:
            for w in dist.batch_isend_irecv(ops):
                w.wait()
        d_kv = grads.new_zeros(kv_shape)
        for s, g in back.items():
            idx = send_idx[s]
            d_kv[:, :, idx[:, 0], idx[:, 1]] += g  # pairs are unique per peer; peers may overlap
        return d_kv[0], d_kv[1], None, None, None, None


class SparseExchangeAttention(SequenceParallelCore):
    """Context-parallel block-sparse attention that moves only the K/V blocks the pattern reads.

    Args:
        inner: a block-sparse core whose options declare the ``sparse_exchange`` form
            holding the pattern.
        group: the sequence-parallel process group (zigzag-sharded inputs, as for ``ring``).
        counter: optional communication counter (``sparse_kv`` bytes and calls).
    """

    def __init__(self, inner: CoreAttention, group: dist.ProcessGroup, counter: CommCounter | None = None) -> None:
        super().__init__(inner, group, counter, zigzag=True)
        self._plans: dict[int, tuple] = {}

    def _plan(self, n_blocks: int, n_kv_heads: int | None = None):
        """Pattern and send/receive lists for ``n_blocks`` blocks and the KV heads this rank runs
        (fewer than the layer's under hybrid, where Ulysses gave it a slice of the heads)."""
        key = (n_blocks, n_kv_heads or self.ctx.n_kv_heads)
        if key not in self._plans:
            self._plans[key] = self._build_plan(*key)
        return self._plans[key]

    def _build_plan(self, n_blocks: int, n_kv_heads: int):
        pattern = self.inner.pattern(n_blocks, torch.device("cpu"))
        plan = exchange_plan(pattern, n_kv_heads, self.P)
        owned = [owned_blocks(r, self.P, n_blocks) for r in range(self.P)]
        local_of = torch.full((n_blocks,), -1, dtype=torch.long)
        local_of[owned[self.rank]] = torch.arange(len(owned[self.rank]))
        # what I send to s: plan[s][me] in my local block numbering; what I receive from s: plan[me][s]
        send = [plan[s][self.rank].clone() for s in range(self.P)]
        for idx in send:
            if len(idx):
                idx[:, 1] = local_of[idx[:, 1]]
        recv = [plan[self.rank][s] for s in range(self.P)]
        return pattern, send, recv

    def analytic_bytes(self, batch: int, seq_len: int, element_size: int) -> int:
        """Bytes this rank sends per forward + backward: the K/V blocks its peers read, then the
        gradients of the blocks it read back to their owners."""
        _, send, recv = self._plan(seq_len // self.inner.block)
        pairs = sum(len(s) for s in send) + sum(len(r) for r in recv)
        return 2 * batch * pairs * self.inner.block * self.ctx.head_dim * element_size

    def dense_ring_bytes(self, batch: int, seq_len: int, element_size: int) -> int:
        """What a dense ring would send for this layer instead (the baseline of the savings)."""
        return dense_ring_bytes(batch, seq_len // self.P, self.ctx.n_kv_heads, self.ctx.head_dim, self.P,
                                element_size)

    def forward(self, q_BHSD, k_BHSD, v_BHSD, batch: AttentionBatch):
        self.training_only(batch)
        B, H, L, D = q_BHSD.shape
        Hkv, blk, P = k_BHSD.shape[1], self.inner.block, self.P
        S = L * P
        if S % (2 * P * blk):
            raise ConfigError("train.seq_len", f"{S} is not divisible by 2 x sp_degree x block = {2 * P * blk} "
                              "(sparsity-aware ring keeps whole blocks in each zigzag chunk).",
                              f"use a multiple of {2 * P * blk}.")
        n = S // blk
        pattern, send, recv = self._plan(n, Hkv)
        pattern = pattern.to(q_BHSD.device)
        doc_all = self.global_doc_ids(batch.doc_ids_BS)  # document id of every global position

        nb = L // blk
        kb = k_BHSD.reshape(B, Hkv, nb, blk, D)
        vb = v_BHSD.reshape(B, Hkv, nb, blk, D)
        k_got, v_got = _Exchange.apply(kb, vb, send, [len(r) for r in recv], self.group, self.counter)
        recv_idx = torch.cat(recv).to(q_BHSD.device)  # (n_recv, 2): KV head, global block
        # per KV head: own L tokens, then its received blocks (padded to the largest count)
        counts = torch.bincount(recv_idx[:, 0], minlength=Hkv) if len(recv_idx) else torch.zeros(Hkv, dtype=torch.long)
        R = int(counts.max()) if len(recv_idx) else 0
        slot = torch.zeros(len(recv_idx), dtype=torch.long, device=q_BHSD.device)
        for g in range(Hkv):  # rank of each pair among those of its head
            sel = (recv_idx[:, 0] == g).nonzero(as_tuple=True)[0]
            slot[sel] = torch.arange(len(sel), device=q_BHSD.device)
        k_extra = k_got.new_zeros(B, Hkv, R, blk, D)
        v_extra = v_got.new_zeros(B, Hkv, R, blk, D)
        if R:  # differentiable scatter into fresh buffers
            k_extra[:, recv_idx[:, 0], slot] = k_got
            v_extra[:, recv_idx[:, 0], slot] = v_got
        k_all = torch.cat([k_BHSD, k_extra.reshape(B, Hkv, R * blk, D)], dim=2)
        v_all = torch.cat([v_BHSD, v_extra.reshape(B, Hkv, R * blk, D)], dim=2)

        dev = q_BHSD.device
        q_pos = zigzag_positions(self.rank, P, L, dev)  # (L,)
        extra_pos = torch.full((Hkv, R, blk), -1, dtype=torch.long, device=dev)
        if R:
            extra_pos[recv_idx[:, 0], slot] = recv_idx[:, 1:2] * blk + torch.arange(blk, device=dev)
        k_pos = torch.cat([q_pos.expand(Hkv, L), extra_pos.reshape(Hkv, R * blk)], dim=1)  # (Hkv, Nk)
        # block-sparse over the buffer (own zigzag tokens + received blocks) through the fused paths,
        # the pattern's token rules on global positions; no score matrix over the whole buffer
        lay = BufferLayout(q_pos, k_pos, doc_all)
        return gathered_block_attention(q_BHSD, k_all, v_all, pattern, lay, self.softmax_scale)
