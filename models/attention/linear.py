"""Linear attention with per-head decay (Lightning Attention / TransNormerLLM style).

Softmax-free: o_t = sum_{s<=t} lambda_h^{t-s} (phi(q_t) . phi(k_s)) v_s, followed by a
parameter-free RMS normalisation per head. Training uses the blocked form (exact intra-block
part + running KV state), decoding the recurrent state (``uses_kv_cache = False``: the cache holds
one D x D state per head instead of past keys/values).

Decay choice: ALiBi-like slopes a_h = 2^(-8 (h+1) / H), lambda_h = exp(-a_h), so every head decays
(head 0 the fastest); with ``decay: alibi_layer`` they are further scaled by
(1 - l/(L-1) + 1e-5) per layer l as in TransNormerLLM, so the top layer is nearly undecayed.
``decay: none`` gives plain causal linear attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from longshard.errors import require, require_positive
from longshard.kernels.lightning import (
    lightning_attention_chunk,
    lightning_attention_naive,
    lightning_attention_recurrent,
)
from longshard.kernels.lightning.triton import TRITON_CHUNKS, lightning_attention_triton
from longshard.kernels.triton_support import triton_installed
from longshard.models.attention.registry import (
    AttentionBatch,
    AttentionContext,
    AttentionOptions,
    CoreAttention,
    dense_attention_flops,
    register_attention,
)

DECAYS = ("alibi", "alibi_layer", "none")
FEATURE_MAPS = ("silu", "elu1", "identity")
LINEAR_PATHS = ("auto", "naive", "chunk", "triton")


@dataclass(kw_only=True)
class LinearOptions(AttentionOptions):
    """Options of ``linear``.

    Args:
        chunk: block size of the blocked form.
        decay: ``alibi``, ``alibi_layer`` or ``none`` (see the module docstring).
        feature_map: phi applied to q and k: ``silu`` (TransNormerLLM), ``elu1`` (elu + 1) or ``identity``.
        normalize: RMS-normalise each head's output (TransNormerLLM's SRMSNorm, no weight).
        path: ``auto`` (triton on CUDA when installed and ``chunk`` is a kernel tile size, else
            chunk), ``chunk`` (PyTorch blocked form), ``triton`` (Triton kernels; CUDA or the CPU
            interpreter) or ``naive`` (quadratic reference).
    """

    chunk: int = 64
    decay: str = "alibi_layer"
    feature_map: str = "silu"
    normalize: bool = True
    path: str = "auto"

    def __post_init__(self) -> None:
        require_positive(self.chunk, "chunk")
        require(self.decay in DECAYS, "decay", f"unknown decay {self.decay!r}.", f"use one of: {', '.join(DECAYS)}.")
        require(self.feature_map in FEATURE_MAPS, "feature_map", f"unknown feature map {self.feature_map!r}.",
                f"use one of: {', '.join(FEATURE_MAPS)}.")
        require(self.path in LINEAR_PATHS, "path", f"unknown path {self.path!r}.",
                f"use one of: {', '.join(LINEAR_PATHS)}.")
        require(self.path != "triton" or self.chunk in TRITON_CHUNKS, "chunk",
                f"path triton needs chunk in {TRITON_CHUNKS}, got {self.chunk}.",
                "set chunk to one of those or use path chunk.")

    def context_parallel(self) -> str | None:
        return "state"


def decay_rates(n_heads: int, layer_idx: int, n_layers: int, kind: str) -> torch.Tensor:
    """(H,) a_h >= 0 with per-step decay exp(-a_h)."""
    if kind == "none":
        return torch.zeros(n_heads)
    a = torch.tensor([2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)])
    if kind == "alibi_layer":
        a = a * (1 - layer_idx / max(n_layers - 1, 1) + 1e-5)
    return a


@register_attention("linear", LinearOptions)
class LinearAttention(CoreAttention):
    """Decayed causal linear attention (lightning), blocked for training, recurrent for decoding."""

    uses_kv_cache = False

    def __init__(self, ctx: AttentionContext, opts: LinearOptions) -> None:
        super().__init__(ctx, opts)
        self.register_buffer("log_decay", decay_rates(ctx.n_heads, ctx.layer_idx, ctx.n_layers, opts.decay),
                             persistent=False)

    cp_form = "state"

    def set_head_slice(self, start: int, stop: int) -> None:
        """Run query heads [start, stop) (of all the layer's heads; calling it again re-slices)."""
        if not hasattr(self, "_all_log_decay"):
            self._all_log_decay = self.log_decay
        self.log_decay = self._all_log_decay[start:stop].to(self.log_decay.device)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Intra-chunk causal attention ((C + 1) / 2 keys) plus the state read and update (2 x D x D each)."""
        C, D = min(self.opts.chunk, seq_len), self.ctx.head_dim
        return dense_attention_flops(self.ctx.n_heads, D, C) + 4.0 * self.ctx.n_heads * D * D

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        if self.opts.feature_map == "silu":
            return F.silu(x)
        if self.opts.feature_map == "elu1":
            return F.elu(x) + 1
        return x

    def features(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor):
        """Feature-mapped q, k and values, with KV heads repeated to the query heads."""
        rep = q_BHSD.shape[1] // k_BHSD.shape[1]
        return self.phi(q_BHSD), self.phi(k_BHSD).repeat_interleave(rep, dim=1), v_BHSD.repeat_interleave(rep, dim=1)

    def finish(self, o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Output normalisation (per-head RMS, no weight) when enabled."""
        if self.opts.normalize:
            o32 = o.float()
            o = o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + 1e-6)
        return o.to(dtype)

    def forward(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch):
        q, k, v = self.features(q_BHSD, k_BHSD, v_BHSD)
        slot = batch.cache_slot
        if slot is not None:  # decoding: continue the recurrent state (blocked form for a prefill)
            if q.shape[2] == 1:
                o, slot["state"] = lightning_attention_recurrent(q, k, v, self.log_decay, slot.get("state"))
            else:
                o, slot["state"] = lightning_attention_chunk(
                    q, k, v, self.log_decay, None, self.opts.chunk, initial_state_BHDV=slot.get("state"))
        elif self.opts.path == "naive":
            o = lightning_attention_naive(q, k, v, self.log_decay, batch.doc_ids_BS)
        elif self.opts.path == "triton" or (
            self.opts.path == "auto" and q.is_cuda and triton_installed() and self.opts.chunk in TRITON_CHUNKS
        ):
            o, _ = lightning_attention_triton(q, k, v, self.log_decay, batch.doc_ids_BS, self.opts.chunk)
        else:
            o, _ = lightning_attention_chunk(q, k, v, self.log_decay, batch.doc_ids_BS, self.opts.chunk)
        return self.finish(o, q_BHSD.dtype)
