"""Ring (context-parallel) attention with zigzag load balance, for dense causal attention.

Each of P ranks holds two of 2P sequence chunks (rank r: chunks r and 2P-1-r, so every rank has
the same causal work). Keys/values travel around the ring with ``batch_isend_irecv``; the next
block is in flight while the current one is computed. Partial outputs are merged exactly through
their log-sum-exp. The backward pass rotates K/V again together with their gradient
accumulators, which return to their owner after P hops. Block-sparse variants use the
sparsity-aware exchange of :mod:`longshard.parallel.sparse_exchange` instead.

Per step, each pair of zigzag chunks (local queries x visiting keys) is either fully visible,
causal (the same chunk) or invisible. Visible pairs run through fused kernels
(:mod:`longshard.kernels.attention.pairs`) whose forward returns the log-sum-exp and whose backward
takes the merged log-sum-exp and rowsum(dO * O) (as ring-flash-attn does with flash-attn): the
block-sparse Triton kernel on CUDA (inputs in their dtype, tensor cores for bf16/fp16), PyTorch's
fused flash-attention CPU kernel on CPU. No score matrix is kept for backward: a rank saves q, k, v,
its output and the log-sum-exp. Packed documents are masked per pair (pairs with no shared
document are skipped). Partial outputs, the merge and the gradient accumulators are fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from longshard.errors import require
from longshard.kernels.attention.fused_cpu import merge_partials
from longshard.kernels.attention.pairs import pair_kernel, shares_document
from longshard.models.attention import AttentionBatch, CoreAttention
from longshard.parallel.layout import CommCounter, SequenceParallelCore, dense_ring_bytes, shard_segments
from longshard.parallel.linear_state import LinearStateParallel
from longshard.parallel.sparse_exchange import SparseExchangeAttention
from longshard.parallel.ulysses import UlyssesAttention, kv_replication


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


def _chunk_pairs(r: int, src: int, P: int, L: int) -> list[tuple[slice, slice, bool]]:
    """Zigzag chunk pairs of rank ``r``'s queries and rank ``src``'s keys that see each other:
    (query slice, key slice, causal); a pair is either fully visible or the same chunk (causal)."""
    return [(slice(ql, ql + n), slice(kl, kl + m), qg == kg)
            for ql, qg, n in shard_segments(r, P, L, True) for kl, kg, m in shard_segments(src, P, L, True)
            if kg <= qg]


def _docs(doc_all: torch.Tensor | None, rank: int, s: slice) -> torch.Tensor | None:
    """(B, chunk) document ids of ``rank``'s chunk ``s``, or None without packed documents."""
    return None if doc_all is None else doc_all[rank][:, s]


def _own_chunks(L: int, *tensors: torch.Tensor) -> dict[int, list[torch.Tensor]]:
    """This rank's two zigzag chunks of each tensor (along dim 2), made contiguous once per call:
    ``{local start: [chunk of each tensor]}`` (the pair kernels would otherwise copy them every step)."""
    c = L // 2
    return {s: [t[:, :, s : s + c].contiguous() for t in tensors] for s in (0, c)}


class _RingAttnFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, doc_all, ring: _Ring, ops):
        P, r = ring.P, ring.r
        B, H, L, D = q.shape
        o = torch.zeros(B, H, L, D, dtype=torch.float32, device=q.device)
        lse = torch.full((B, H, L), float("-inf"), device=q.device)
        kv = [k, v]
        q_own = _own_chunks(L, q)
        for step in range(P):
            src = (r - step) % P
            pending = ring.start(kv) if step < P - 1 else None  # next block in flight during compute
            for qs, ks, causal in _chunk_pairs(r, src, P, L):  # each pair fully visible or causal
                dq_, dk_ = _docs(doc_all, r, qs), _docs(doc_all, src, ks)
                if not shares_document(dq_, dk_):
                    continue
                ob, lb = ops.forward(q_own[qs.start][0], kv[0][:, :, ks], kv[1][:, :, ks], causal, dq_, dk_)
                o[:, :, qs], lse[:, :, qs] = merge_partials(o[:, :, qs], lse[:, :, qs], ob, lb)
            if pending is not None:
                ring.wait(pending)
                kv = pending[1]
        o_out = o.to(q.dtype)  # kept for backward in the input dtype, as flash-attn keeps its output
        ctx.save_for_backward(q, k, v, o_out, lse, *([] if doc_all is None else [doc_all]))
        ctx.ring, ctx.ops, ctx.has_doc = ring, ops, doc_all is not None
        return o_out

    @staticmethod
    def backward(ctx, grad_o):
        q, k, v, o, lse, *rest = ctx.saved_tensors
        doc_all = rest[0] if ctx.has_doc else None
        ring, ops = ctx.ring, ctx.ops
        P, r = ring.P, ring.r
        L = q.shape[2]
        go = grad_o.to(q.dtype).contiguous()
        delta = (go.float() * o.float()).sum(-1)  # rowsum(dO * O) of the merged output, as flash-attn's
        dq = torch.zeros_like(q, dtype=torch.float32)
        state = [k, v, torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)]
        own = _own_chunks(L, go, q, o, lse, delta)
        for step in range(P):
            src = (r - step) % P
            kb, vb, dk_acc, dv_acc = state
            # K/V go on to the next rank while this step computes with them (as in forward); their
            # gradient accumulators follow once this step has added to them
            kv_next = ring.start([kb, vb]) if step < P - 1 else None
            for qs, ks, causal in _chunk_pairs(r, src, P, L):
                dq_, dk_ = _docs(doc_all, r, qs), _docs(doc_all, src, ks)
                if not shares_document(dq_, dk_):
                    continue
                go_c, q_c, o_c, lse_c, delta_c = own[qs.start]
                g = ops.backward(go_c, q_c, kb[:, :, ks], vb[:, :, ks], o_c, lse_c, delta_c, causal, dq_, dk_)
                dq[:, :, qs] += g[0]
                dk_acc[:, :, ks] += g[1]
                dv_acc[:, :, ks] += g[2]
            # the accumulators travel one hop per step, P in all: they end at the rank that owns their K/V
            acc_next = ring.start([dk_acc, dv_acc])
            ring.wait(acc_next)
            if kv_next is not None:
                ring.wait(kv_next)
            state = [*(kv_next[1] if kv_next is not None else (None, None)), *acc_next[1]]
        dk, dv = state[2], state[3]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


class RingAttention(SequenceParallelCore):
    """Dense causal attention over a zigzag-sharded sequence (wraps the layer's dense core).

    Args:
        inner: the layer's ``dense`` core attention (its softmax scale is reused).
        group: the sequence-parallel process group.
        counter: optional communication counter.
        pair_backend: the fused chunk-pair kernels (:func:`~longshard.kernels.attention.pairs.pair_kernel`):
            ``auto`` (Triton on CUDA, PyTorch's fused CPU kernel on CPU), or ``triton`` / ``cpu_fused``.
    """

    def __init__(self, inner: CoreAttention, group: dist.ProcessGroup, counter: CommCounter | None = None,
                 pair_backend: str = "auto") -> None:
        super().__init__(inner, group, counter, zigzag=True)
        self.ring = _Ring(group, counter)
        self.pair_backend = pair_backend
        self._ops: dict[str, object] = {}  # per device type: the pair kernels (they cache block lists)

    def analytic_bytes(self, batch: int, seq_len: int, element_size: int) -> int:
        """Bytes this rank sends per forward + backward (:func:`~longshard.parallel.layout.dense_ring_bytes`)."""
        return dense_ring_bytes(batch, seq_len // self.P, self.ctx.n_kv_heads, self.ctx.head_dim, self.P,
                                element_size)

    def forward(self, q_BHSD, k_BHSD, v_BHSD, batch: AttentionBatch):
        self.training_only(batch)
        if q_BHSD.shape[2] % 2:
            raise ValueError(f"a zigzag shard holds two equal chunks; got {q_BHSD.shape[2]} local tokens")
        doc_all = self.gather_doc_ids(batch.doc_ids_BS)  # (P, B, L): each rank's zigzag document ids
        dev = q_BHSD.device.type
        if dev not in self._ops:
            self._ops[dev] = pair_kernel(q_BHSD.device, self.softmax_scale, self.pair_backend)
        return _RingAttnFn.apply(q_BHSD, k_BHSD, v_BHSD, doc_all, self.ring, self._ops[dev])


def ring_form(core: CoreAttention, group: dist.ProcessGroup, counter: CommCounter | None = None,
              where: str = "a layer", pair_backend: str = "auto") -> CoreAttention:
    """``core`` made context-parallel over ``group`` for zigzag-sharded inputs.

    Dense cores get :class:`RingAttention`; block-sparse cores (``s2``, ``power``, ``streaming``,
    ``sliding_window``) the sparsity-aware exchange
    (:class:`~longshard.parallel.sparse_exchange.SparseExchangeAttention`), which moves only the
    K/V blocks the pattern reads; ``linear`` cores pass their recurrent states along the zigzag
    order (:class:`~longshard.parallel.linear_state.LinearStateParallel`).

    Raises:
        ConfigError: a variant with no ring form (``nsa``, ``nosa``, ``mixed``, ``streaming_gated``:
            their selection or gates need every key of a head; use ``ulysses``).
    """
    form = core.cp_form  # declared by the variant's options
    require(form is not None, "parallel.sp_mode",
            f"ring and hybrid run variants whose options declare a ring form; {where} uses "
            f"{type(core).__name__}, which declares none (its block selection or gates need all of a head's keys).",
            "use sp_mode=ulysses for this variant.")
    if form == "ring":
        return RingAttention(core, group, counter, pair_backend)
    if form == "state":
        return LinearStateParallel(core, group, counter, zigzag=True)
    if form == "sparse_exchange":
        return SparseExchangeAttention(core, group, counter)
    raise ValueError(f"{type(core).__name__} declares an unknown context-parallel form {form!r}")


def apply_ring(model, group: dist.ProcessGroup, counter: CommCounter | None = None,
               ulysses_group: dist.ProcessGroup | None = None, pair_backend: str = "auto"):
    """Make every layer's core attention context-parallel over ``group`` (in place; see :func:`ring_form`).

    With ``ulysses_group`` (hybrid 2-D, USP-style): Ulysses all-to-alls inside that group, each
    rank running its slice of the heads, around the ring over ``group``. ``pair_backend``: see
    :class:`RingAttention` (tests force ``triton`` on CPU under the interpreter).

    Raises:
        ConfigError: a variant with no ring form (see :func:`ring_form`).
    """
    for i, layer in enumerate(model.layers):
        core = layer.attention.core_attention
        kv_repeat = 1
        if ulysses_group is not None:
            U, u = dist.get_world_size(ulysses_group), dist.get_rank(ulysses_group)
            H = layer.attention.n_heads
            kv_repeat = kv_replication(H, layer.attention.n_kv_heads, U)
            off = layer.attention.head_offset  # tensor parallel: this rank's heads start here
            core.set_head_slice(off + u * H // U, off + (u + 1) * H // U)
        wrapped = ring_form(core, group, counter, f"layer {i}", pair_backend)
        if ulysses_group is not None:
            wrapped = UlyssesAttention(wrapped, ulysses_group, kv_repeat, counter)
        layer.attention.core_attention = wrapped
    return model


def sparse_exchange_traffic(model: torch.nn.Module, batch: int, seq_len: int,
                            element_size: int) -> dict[str, int] | None:
    """Analytic bytes one rank sends per micro-batch (forward + backward) in the layers that use the
    sparsity-aware exchange, and what a dense ring would send for the same layers; None when no layer
    exchanges sparsely or a Ulysses group splits the heads (hybrid: each rank's share differs).

    Args:
        model: the parallelized model (unwrapped: its ``layers``).
        batch: sequences per micro-batch.
        seq_len: tokens per sequence (the whole sequence, before sharding).
        element_size: bytes per K/V element in the attention (2 for bf16, 4 for fp32).
    """
    mods = [m for layer in model.layers for m in layer.attention.core_attention.modules()]
    cores = [m for m in mods if isinstance(m, SparseExchangeAttention)]
    if not cores or any(isinstance(m, UlyssesAttention) for m in mods):
        return None
    return {"layers": len(cores),
            "sparse_exchange_bytes": sum(c.analytic_bytes(batch, seq_len, element_size) for c in cores),
            "dense_ring_bytes": sum(c.dense_ring_bytes(batch, seq_len, element_size) for c in cores)}
