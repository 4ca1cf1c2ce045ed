"""Band + far block-sparse attention as a few fused flash-attention calls over query chunks.

For a chunk of ``chunk_blocks`` query blocks, the keys any of its queries may read are one
contiguous band (the chunk plus the ``band_blocks - 1`` blocks before it, read at block distance
< ``band_blocks``) and, per head, the far blocks some query of the chunk is at least
``band_blocks`` past. The band mask (causality, distance, token windows/sinks, documents) is
broadcast over heads where the rule allows; the far mask covers padding, the far token limit,
documents and far blocks inside the band range (read only by the chunk's later queries). The
cost is (far + band + chunk) keys per query instead of every earlier key, with no S x S score
matrix. Exact (the same set of keys per query as :mod:`banded`).

On CPU each chunk is two calls of PyTorch's fused flash kernel (band keys; far keys gathered per
head, see :mod:`longshard.kernels.attention.fused_cpu`) merged by log-sum-exp, inside one autograd
function whose backward runs the fused backward per call and accumulates the K/V gradients in
place. Elsewhere (CUDA, or a build without those ops) each chunk is one
``F.scaled_dot_product_attention`` call over [far keys, band keys], differentiated by autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from longshard.kernels.attention.fused_cpu import acc_dtype, additive_mask, fused_cpu_ops, merge_partials
from longshard.kernels.block_sparse.banded import require_no_full_heads
from longshard.kernels.block_sparse.pattern import BandFarSpec, kept_first


@dataclass
class _Chunk:
    """One query chunk: queries [q0, q1) against band keys [k0, q1) and per-head far key positions.

    Masks are boolean and broadcast where a rule does not depend on a dimension: ``band_keep`` is
    (1 or B, 1 or H, Cq, q1 - k0); ``far_keep`` is (1 or B, H, 1 or Cq, n_far) and ``far_pos_HF`` None
    when the chunk reads no far block. A query reads a band key only at block distance < band_blocks
    and a far key only at distance >= band_blocks, so the two sets never overlap.
    """

    q0: int
    q1: int
    k0: int
    band_keep: torch.Tensor
    far_pos_HF: torch.Tensor | None = None  # (H, n_far) key positions (clamped into the sequence)
    far_keep: torch.Tensor | None = None


class _Plan:
    """The per-chunk key sets and masks of a :class:`BandFarSpec` at one sequence length."""

    def __init__(self, S: int, H: int, spec: BandFarSpec, doc_ids_BS: torch.Tensor | None,
                 device: torch.device, chunk_blocks: int) -> None:
        self.S, self.H, self.doc = S, H, doc_ids_BS
        self.blk, self.L = spec.block, spec.band_blocks
        self.n = math.ceil(S / self.blk)
        self.starts = list(range(0, self.n, chunk_blocks))
        self.chunk_blocks = chunk_blocks
        dev = self.dev = device
        self.far = spec.far_HF.to(dev) if spec.far_HF is not None and spec.far_HF.shape[1] else None
        uniform = lambda t: t[:1] if bool((t == t[0]).all()) else t  # one value for every head: broadcast
        self.window = uniform(spec.window_H.to(dev))[:, None, None] if spec.window_H is not None else None
        self.sink = uniform(spec.sink_H.to(dev))[:, None, None] if spec.sink_H is not None else None
        self.limit = spec.far_token_limit_H.to(dev)[:, None] if spec.far_token_limit_H is not None else None

    def chunk(self, c0: int) -> _Chunk:
        """Key sets and masks of the chunk starting at query block ``c0``."""
        S, H, blk, L, dev = self.S, self.H, self.blk, self.L, self.dev
        c1 = min(c0 + self.chunk_blocks, self.n)
        q0, q1 = c0 * blk, min(c1 * blk, S)
        k0 = max(c0 - L + 1, 0) * blk
        q_pos = torch.arange(q0, q1, device=dev)  # (Cq,)
        band_pos = torch.arange(k0, q1, device=dev)  # (Lb,)
        # band: causal, within L blocks; token window / sinks per head where given
        keep = (band_pos[None, :] <= q_pos[:, None]) & ((q_pos // blk)[:, None] - (band_pos // blk)[None, :] < L)
        keep = keep[None, None]  # (1, 1, Cq, Lb)
        if self.window is not None:
            w_ok = (self.window <= 0) | ((q_pos[:, None] - band_pos[None, :])[None] < self.window)
            if self.sink is not None:
                w_ok = w_ok | (band_pos[None, None, :] < self.sink)
            keep = keep & w_ok[None]
        if self.doc is not None:
            keep = keep & (self.doc[:, q0:q1, None] == self.doc[:, None, k0:q1])[:, None]
        out = _Chunk(q0, q1, k0, keep)
        if self.far is None:
            return out
        # far: the head's far blocks some query of the chunk is >= L blocks past (j <= c1 - 1 - L)
        reach = (self.far >= 0) & (self.far <= c1 - 1 - L)  # (H, F)
        n_far = int(reach.sum(1).max()) if reach.any() else 0
        if n_far == 0:
            return out
        order = kept_first(reach)
        fb = torch.gather(self.far, 1, order[:, :n_far])  # (H, n_far) block ids, valid first
        f_ok = torch.gather(reach, 1, order[:, :n_far])
        fpos = (fb.clamp_min(0)[..., None] * blk + torch.arange(blk, device=dev)).reshape(H, n_far * blk)
        fk = (f_ok.repeat_interleave(blk, dim=1) & (fpos < S))[None, :, None]  # (1, H, 1, n_far*blk)
        if self.limit is not None:
            fk = fk & ((self.limit <= 0) | (fpos < self.limit))[None, :, None]
        if bool((fb[f_ok] > c0 - L).any()):  # a far block inside the band range: only later queries read it
            fk = fk & (fpos[:, None, :] < ((q_pos // blk - L + 1) * blk)[None, :, None])[None]  # i - j >= L
        fpos = fpos.clamp_max(S - 1)
        if self.doc is not None:
            fk = fk & (self.doc[:, None, q0:q1, None] == self.doc[:, fpos][:, :, None, :])
        out.far_pos_HF, out.far_keep = fpos, fk
        return out


def _band(x_BHSD: torch.Tensor, c: _Chunk, H: int) -> torch.Tensor:
    """(B, H, q1 - k0, D): the chunk's band keys with KV heads repeated to the query heads."""
    G = H // x_BHSD.shape[1]
    band = x_BHSD[:, :, c.k0 : c.q1]
    return band.repeat_interleave(G, dim=1) if G > 1 else band


def _far(x_BHSD: torch.Tensor, c: _Chunk, H: int) -> torch.Tensor:
    """(B, H, n_far, D): the chunk's far keys, gathered per query head."""
    kv_head = torch.arange(H, device=x_BHSD.device) // (H // x_BHSD.shape[1])
    return x_BHSD[:, kv_head[:, None], c.far_pos_HF]


class _FusedChunked(torch.autograd.Function):
    """Every chunk as two fused CPU flash calls (band keys; far keys) merged by log-sum-exp.

    Backward runs the fused backward of each call with the merged output and log-sum-exp (which
    gives each call's share of the gradients), with the chunks' masks rebuilt from the plan (a
    chunk's far mask grows with S, so keeping every chunk's would be O(S^2) in all) and their keys
    gathered again, and adds the K/V gradients into one accumulator in place.
    """

    @staticmethod
    def forward(ctx, q_BHSD, k_BHSD, v_BHSD, plan: _Plan, scale: float):
        fwd, _ = fused_cpu_ops()
        H = q_BHSD.shape[1]
        acc = acc_dtype(q_BHSD)  # the fused backward takes the log-sum-exp in its inputs' precision
        outs, lses = [], []
        for c0 in plan.starts:
            c = plan.chunk(c0)
            q_c = q_BHSD[:, :, c.q0 : c.q1]
            o, lse = fwd(q_c, _band(k_BHSD, c, H), _band(v_BHSD, c, H), 0.0, False,
                         attn_mask=additive_mask(c.band_keep, q_BHSD.dtype), scale=scale)
            if c.far_pos_HF is not None:
                o_f, lse_f = fwd(q_c, _far(k_BHSD, c, H), _far(v_BHSD, c, H), 0.0, False,
                                 attn_mask=additive_mask(c.far_keep, q_BHSD.dtype), scale=scale)
                lse_f = lse_f.masked_fill(~c.far_keep.any(-1), float("-inf"))  # rows without far keys
                o, lse = merge_partials(o, lse.to(acc), o_f, lse_f.to(acc))
            outs.append(o.to(q_BHSD.dtype).contiguous())
            lses.append(lse.to(acc).contiguous())
        ctx.save_for_backward(q_BHSD, k_BHSD, v_BHSD, *outs, *lses)
        ctx.plan, ctx.scale = plan, scale  # masks are rebuilt per chunk in backward
        return torch.cat(outs, dim=2)

    @staticmethod
    def backward(ctx, grad_BHSD):
        _, bwd = fused_cpu_ops()
        q, k, v, *rest = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        n_c = len(plan.starts)
        B, H, S, D = q.shape
        Hkv = k.shape[1]
        acc = acc_dtype(q)
        dq = torch.empty_like(q)
        dk_H = torch.zeros(B, H, S, D, dtype=acc, device=q.device)
        dv_H = torch.zeros(B, H, S, v.shape[-1], dtype=acc, device=q.device)
        for c0, o, lse in zip(plan.starts, rest[:n_c], rest[n_c:]):
            c = plan.chunk(c0)
            q_c, g_c = q[:, :, c.q0 : c.q1], grad_BHSD[:, :, c.q0 : c.q1].contiguous()
            dq_c, dk_c, dv_c = bwd(g_c, q_c, _band(k, c, H), _band(v, c, H), o, lse, 0.0, False,
                                   attn_mask=additive_mask(c.band_keep, q.dtype), scale=scale)
            dk_H[:, :, c.k0 : c.q1] += dk_c
            dv_H[:, :, c.k0 : c.q1] += dv_c
            if c.far_pos_HF is not None:
                dq_f, dk_f, dv_f = bwd(g_c, q_c, _far(k, c, H), _far(v, c, H), o, lse, 0.0, False,
                                       attn_mask=additive_mask(c.far_keep, q.dtype), scale=scale)
                dq_c = dq_c + dq_f
                idx = c.far_pos_HF[None, :, :, None].expand(B, H, -1, D)
                dk_H.scatter_add_(2, idx, dk_f.to(acc))
                dv_H.scatter_add_(2, idx, dv_f.to(acc))
            dq[:, :, c.q0 : c.q1] = dq_c
        dk = dk_H.view(B, Hkv, H // Hkv, S, D).sum(2)
        dv = dv_H.view(B, Hkv, H // Hkv, S, -1).sum(2)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None


def band_far_attention_chunked(
    q_BHSD: torch.Tensor,
    k_BHSD: torch.Tensor,
    v_BHSD: torch.Tensor,
    spec: BandFarSpec,
    doc_ids_BS: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_blocks: int = 4,
    fused: bool | None = None,
) -> torch.Tensor:
    """Band + far block-sparse causal attention (Sq == Sk), ``chunk_blocks`` query blocks per fused call.

    Args: as :func:`longshard.kernels.block_sparse.banded.band_far_attention`, plus
        chunk_blocks: query blocks per call (more = fewer calls, more masked band keys).
        fused: run the chunks through the fused CPU kernel directly (None = when on CPU and
            available; False = one ``F.scaled_dot_product_attention`` call per chunk).
    """
    require_no_full_heads(spec)
    B, H, S, D = q_BHSD.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    plan = _Plan(S, H, spec, doc_ids_BS, q_BHSD.device, chunk_blocks)
    if fused is None:
        fused = q_BHSD.device.type == "cpu" and fused_cpu_ops() is not None
    if fused:
        return _FusedChunked.apply(q_BHSD, k_BHSD, v_BHSD, plan, scale)
    outs = []
    for c0 in plan.starts:  # one SDPA call per chunk over [far keys, band keys]
        c = plan.chunk(c0)
        if c.far_pos_HF is None:  # band only: keys are a slice of k (no copy), GQA inside SDPA
            kc, vc, mask = k_BHSD[:, :, c.k0 : c.q1], v_BHSD[:, :, c.k0 : c.q1], c.band_keep
        else:
            kc = torch.cat([_far(k_BHSD, c, H), _band(k_BHSD, c, H)], dim=2)
            vc = torch.cat([_far(v_BHSD, c, H), _band(v_BHSD, c, H)], dim=2)
            shape = (max(c.band_keep.shape[0], c.far_keep.shape[0]), H, c.q1 - c.q0, -1)
            mask = torch.cat([c.far_keep.expand(shape), c.band_keep.expand(shape)], dim=3)
        outs.append(F.scaled_dot_product_attention(q_BHSD[:, :, c.q0 : c.q1], kc, vc, attn_mask=mask,
                                                   scale=scale, enable_gqa=kc.shape[1] != H))
    return torch.cat(outs, dim=2)
