"""Ring (context-parallel) attention with zigzag load balance, for dense causal attention.

Each of P ranks holds two of 2P sequence chunks (rank r: chunks r and 2P-1-r, so every rank has
the same causal work). Keys/values travel around the ring with ``batch_isend_irecv``; the next
block is in flight while the current one is computed. Partial outputs are merged exactly through
their log-sum-exp. The backward pass rotates K/V again together with their gradient
accumulators, which return to their owner after P hops. Block-sparse variants use the
sparsity-aware exchange of :mod:`longshard.parallel.sparse_exchange` instead.

Per step, each pair of zigzag chunks (local queries x visiting keys) is either fully visible,
causal (the same chunk) or invisible. On CPU the visible pairs run through PyTorch's fused
flash-attention CPU kernel, whose forward returns the log-sum-exp and whose backward takes the
merged output and log-sum-exp (as ring-flash-attn does with flash-attn on GPU); packed documents
add an additive document mask per pair (pairs with no shared document are skipped). Otherwise
(CUDA, for now, or an odd shard length) the fp32 reference math with explicit scores runs.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from longshard.errors import require
from longshard.kernels.attention.fused_cpu import additive_mask, fused_cpu_ops, merge_partials
from longshard.kernels.attention.naive import attention_naive
from longshard.models.attention import AttentionBatch, CoreAttention
from longshard.parallel.sequence import CommCounter, shard_segments, zigzag_positions


class _Ring:
    """Rotates tensors one hop around the ring (send to rank+1, receive from rank-1)."""

    def __init__(self, group: dist.ProcessGroup, counter: CommCounter | None) -> None:
        self.group, self.counter = group, counter
        self.P, self.r = dist.get_world_size(group), dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.r + 1) % self.P)
        self.prev = dist.get_global_rank(group, (self.r - 1) % self.P)

    def start(self, tensors: list[torch.Tensor]):
        if self.P == 1:  # a one-rank ring (e.g. hybrid with ring degree 1): the hop is the identity
            return [], list(tensors)
        tensors = [t.contiguous() for t in tensors]
        recv = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in recv]
        if self.counter is not None:
            for t in tensors:
                self.counter.add("ring_p2p", t.numel() * t.element_size())
        return dist.batch_isend_irecv(ops), recv

    @staticmethod
    def wait(handle) -> None:
        for w in handle[0]:
            w.wait()


def _block_backward(q, k, v, o_grad, lse, delta, mask, scale):
    """Gradients of one (query block, key block) pair given the merged softmax statistics (fp32)."""
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    p = torch.exp(s - lse[..., None]).masked_fill(~mask, 0.0)
    dv = torch.einsum("bhqk,bhqd->bhkd", p, o_grad)
    dp = torch.einsum("bhqd,bhkd->bhqk", o_grad, v)
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("bhqk,bhkd->bhqd", ds, k) * scale
    dk = torch.einsum("bhqk,bhqd->bhkd", ds, q) * scale
    return dq, dk, dv


def _chunk_pairs(r: int, src: int, P: int, L: int) -> list[tuple[slice, slice, bool]]:
    """Zigzag chunk pairs of rank ``r``'s queries and rank ``src``'s keys that see each other:
    (query slice, key slice, causal); a pair is either fully visible or the same chunk (causal)."""
    return [(slice(ql, ql + n), slice(kl, kl + m), qg == kg)
            for ql, qg, n in shard_segments(r, P, L, True) for kl, kg, m in shard_segments(src, P, L, True)
            if kg <= qg]


def _pair_mask(doc_all, r: int, src: int, qs: slice, ks: slice, causal: bool) -> torch.Tensor | None:
    """(B, 1, Lq, Lk) keep mask of a chunk pair with packed documents (causal folded in), or None."""
    if doc_all is None:
        return None
    mask = (doc_all[r][:, qs, None] == doc_all[src][:, None, ks])[:, None]
    if causal:  # the same zigzag chunk on both sides: positions align
        mask = mask & torch.ones(mask.shape[-2:], dtype=torch.bool, device=mask.device).tril()
    return mask


class _RingAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_all, ring: _Ring, scale: float):
        P, r = ring.P, ring.r
        B, H, L, D = q.shape
        rep = H // k.shape[1]
        q_pos = zigzag_positions(r, P, L, q.device)
        doc_q = doc_all[r] if doc_all is not None else None
        qf = q.float()
        o = torch.zeros(B, H, L, D, dtype=torch.float32, device=q.device)
        lse = torch.full((B, H, L), float("-inf"), device=q.device)
        kv = [k, v]
        fused = fused_cpu_ops() if (q.device.type == "cpu" and L % 2 == 0) else None
        for step in range(P):
            src = (r - step) % P
            pending = ring.start(kv) if step < P - 1 else None  # next block in flight during compute
            kb = kv[0].float().repeat_interleave(rep, 1)
            vb = kv[1].float().repeat_interleave(rep, 1)
            if fused is not None:  # zigzag chunk pairs through the fused kernel (full or causal each)
                for qs, ks, causal in _chunk_pairs(r, src, P, L):
                    mask = _pair_mask(doc_all, r, src, qs, ks, causal)
                    if mask is None:
                        ob, lb = fused[0](qf[:, :, qs], kb[:, :, ks], vb[:, :, ks], 0.0, causal, scale=scale)
                    elif bool(mask.any()):
                        ob, lb = fused[0](qf[:, :, qs], kb[:, :, ks], vb[:, :, ks], 0.0, False,
                                          attn_mask=additive_mask(mask), scale=scale)
                        lb = lb.masked_fill(~mask.any(-1), float("-inf"))  # rows with no key in this pair
                    else:
                        continue
                    o[:, :, qs], lse[:, :, qs] = merge_partials(o[:, :, qs], lse[:, :, qs], ob, lb)
            else:  # no fused kernel (CUDA, odd shard length): fp32 reference math
                k_pos = zigzag_positions(src, P, L, q.device)
                mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
                if doc_q is not None:
                    mask = mask & (doc_q[:, :, None] == doc_all[src][:, None, :])[:, None]
                if bool(mask.any()):
                    ob, lb = attention_naive(qf, kb, vb, mask, scale, return_lse=True)
                    o, lse = merge_partials(o, lse, ob, lb)
            if pending is not None:
                ring.wait(pending)
                kv = pending[1]
        o_out = o.to(q.dtype)  # kept for backward in the input dtype, as flash-attn keeps its output
        ctx.save_for_backward(q, k, v, o_out, lse, *([] if doc_all is None else [doc_all]))
        ctx.ring, ctx.scale, ctx.has_doc, ctx.fused = ring, scale, doc_all is not None, fused
        return o_out

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, o, lse, *rest = ctx.saved_tensors
        o = o.float()
        doc_all = rest[0] if ctx.has_doc else None
        ring, scale = ctx.ring, ctx.scale
        P, r = ring.P, ring.r
        B, H, L, D = q.shape
        Hkv = k.shape[1]
        rep = H // Hkv
        q_pos = zigzag_positions(r, P, L, q.device)
        qf, go = q.float(), grad_o.float()
        delta = (go * o).sum(-1)
        safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        dq = torch.zeros_like(qf)
        state = [k, v, torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)]
        fused = ctx.fused
        for step in range(P):
            src = (r - step) % P
            kb, vb, dk_acc, dv_acc = state
            kf, vf = kb.float().repeat_interleave(rep, 1), vb.float().repeat_interleave(rep, 1)
            if fused is not None:  # the fused backward with the merged output and log-sum-exp
                dkb, dvb = torch.zeros_like(kf), torch.zeros_like(vf)
                for qs, ks, causal in _chunk_pairs(r, src, P, L):
                    mask = _pair_mask(doc_all, r, src, qs, ks, causal)
                    if mask is not None and not bool(mask.any()):
                        continue
                    g = fused[1](go[:, :, qs], qf[:, :, qs], kf[:, :, ks], vf[:, :, ks], o[:, :, qs],
                                 lse[:, :, qs], 0.0, causal and mask is None,
                                 attn_mask=None if mask is None else additive_mask(mask), scale=scale)
                    dq[:, :, qs] += g[0]
                    dkb[:, :, ks] += g[1]
                    dvb[:, :, ks] += g[2]
                dk_acc = dk_acc + dkb.view(B, Hkv, rep, L, D).sum(2)
                dv_acc = dv_acc + dvb.view(B, Hkv, rep, L, D).sum(2)
            else:
                k_pos = zigzag_positions(src, P, L, q.device)
                mask = (k_pos[None, :] <= q_pos[:, None])[None, None]
                if doc_all is not None:
                    mask = mask & (doc_all[r][:, :, None] == doc_all[src][:, None, :])[:, None]
                if bool(mask.any()):
                    dqb, dkb, dvb = _block_backward(qf, kf, vf, go, safe_lse, delta, mask, scale)
                    dq += dqb
                    dk_acc = dk_acc + dkb.view(B, Hkv, rep, L, D).sum(2)
                    dv_acc = dv_acc + dvb.view(B, Hkv, rep, L, D).sum(2)
            # K/V move on for the next step; their gradient accumulators follow them home (P hops in all)
            handle = ring.start([kb, vb, dk_acc, dv_acc] if step < P - 1 else [dk_acc, dv_acc])
            ring.wait(handle)
            state = handle[1] if step < P - 1 else [None, None, *handle[1]]
        dk, dv = state[2], state[3]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


class RingAttention(CoreAttention):
    """Dense causal attention over a zigzag-sharded sequence (wraps the layer's dense core).

    Args:
        inner: the layer's ``dense`` core attention (its softmax scale is reused).
        group: the sequence-parallel process group.
        counter: optional communication counter.
    """

    def __init__(self, inner: CoreAttention, group: dist.ProcessGroup, counter: CommCounter | None = None) -> None:
        super().__init__(inner.ctx)
        self.scale = getattr(inner, "scale", 1.0 / math.sqrt(inner.ctx.head_dim))
        self.ring = _Ring(group, counter)
        self.group = group

    def forward(self, q_BHSD, k_BHSD, v_BHSD, batch: AttentionBatch):
        if batch.cache_slot is not None:
            raise ValueError("sequence-parallel attention is for training; decode on one device")
        doc_all = None
        if batch.doc_ids_BS is not None:
            parts = [torch.empty_like(batch.doc_ids_BS) for _ in range(self.ring.P)]
            dist.all_gather(parts, batch.doc_ids_BS.contiguous(), group=self.group)
            doc_all = torch.stack(parts)  # (P, B, L): each rank's zigzag document ids
        return _RingAttnFn.apply(q_BHSD, k_BHSD, v_BHSD, doc_all, self.ring, self.scale)


def ring_form(core: CoreAttention, group: dist.ProcessGroup, counter: CommCounter | None = None,
              where: str = "a layer") -> CoreAttention:
    """``core`` made context-parallel over ``group`` for zigzag-sharded inputs.

    Dense cores get :class:`RingAttention`; block-sparse cores (``s2``, ``streaming`` without
    learned gates, ``sliding_window``) the sparsity-aware exchange
    (:class:`~longshard.parallel.sparse_exchange.SparseExchangeAttention`), which moves only the
    K/V blocks the pattern reads; ``linear`` cores pass their recurrent states along the zigzag
    order (:class:`~longshard.parallel.linear_state.LinearStateParallel`).

    Raises:
        ConfigError: a variant with no ring form (``nsa``, ``nosa``, ``mixed``, ``streaming`` with
            learned gates: their selection or gates need every key of a head; use ``ulysses``).
    """
    from longshard.models.attention.dense import DenseAttention
    from longshard.models.attention.linear import LinearAttention
    from longshard.models.attention.s2 import S2Attention
    from longshard.models.attention.sparse_base import BlockSparseAttention
    from longshard.models.attention.streaming import StreamingAttention
    from longshard.parallel.linear_state import LinearStateParallel
    from longshard.parallel.sparse_exchange import SparseExchangeAttention

    if isinstance(core, S2Attention) and core.dense is not None:  # dense_every_n_layers: a dense layer
        core = core.dense
    sparse_ok = isinstance(core, BlockSparseAttention) and not (
        isinstance(core, StreamingAttention) and core.alpha is not None)
    require(isinstance(core, DenseAttention | LinearAttention) or sparse_ok, "parallel.sp_mode",
            f"ring and hybrid support dense, linear and block-sparse attention (s2, streaming without "
            f"learned gates, sliding_window); {where} uses {type(core).__name__}, whose block selection "
            f"or gates need all of a head's keys.", "use sp_mode=ulysses for this variant.")
    if isinstance(core, DenseAttention):
        return RingAttention(core, group, counter)
    if isinstance(core, LinearAttention):
        return LinearStateParallel(core, group, counter, zigzag=True)
    return SparseExchangeAttention(core, group, counter)


def apply_ring(model, group: dist.ProcessGroup, counter: CommCounter | None = None,
               ulysses_group: dist.ProcessGroup | None = None):
    """Make every layer's core attention context-parallel over ``group`` (in place; see :func:`ring_form`).

    With ``ulysses_group`` (hybrid 2-D, USP-style): Ulysses all-to-alls inside that group, each
    rank running its slice of the heads, around the ring over ``group``.

    Raises:
        ConfigError: a variant with no ring form (see :func:`ring_form`).
    """
    from longshard.parallel.sequence import UlyssesAttention, kv_replication

    for i, layer in enumerate(model.layers):
        core = layer.attention.core_attention
        kv_repeat = 1
        if ulysses_group is not None:
            U, u = dist.get_world_size(ulysses_group), dist.get_rank(ulysses_group)
            H = layer.attention.n_heads
            kv_repeat = kv_replication(H, layer.attention.n_kv_heads, U)
            off = getattr(layer.attention, "head_offset", 0)  # tensor parallel: this rank's heads start here
            core.set_head_slice(off + u * H // U, off + (u + 1) * H // U)
        wrapped = ring_form(core, group, counter, f"layer {i}")
        if ulysses_group is not None:
            wrapped = UlyssesAttention(wrapped, ulysses_group, kv_repeat, counter)
        layer.attention.core_attention = wrapped
    return model
