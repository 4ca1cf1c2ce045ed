"""Streaming / retrieval heads (DuoAttention layout) and plain sliding-window attention.

Retrieval KV heads keep full causal attention; streaming KV heads read ``sink`` leading tokens
plus the ``window`` most recent ones. The split comes from the config (``retrieval_heads``);
``streaming_gated`` identifies it, from a trainable mixing value alpha per KV head:
``out = alpha * full + (1 - alpha) * streaming`` with an L1 penalty pulling alpha to 0; heads
whose alpha stays above a threshold are exported as retrieval heads
(:func:`retrieval_assignment`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from longshard.errors import require, require_positive
from longshard.kernels.block_sparse.pattern import BandFarSpec, sink_window_spec
from longshard.models.attention.dense import DenseAttention, DenseOptions
from longshard.models.attention.registry import (
    AttentionBatch,
    AttentionContext,
    AttentionOptions,
    register_attention,
)
from longshard.models.attention.sparse_base import BlockSparseAttention, check_path
from torch import nn


@dataclass(kw_only=True)
class _SinkWindowOptions(AttentionOptions):
    """Sink + window options shared by ``streaming`` and ``streaming_gated`` (checked when built)."""

    sink: int = 128
    window: int = 256
    block: int = 64
    path: str = "auto"

    def __post_init__(self) -> None:
        require(self.sink >= 0, "sink", f"must be >= 0, got {self.sink}.")
        require_positive(self.window, "window")
        require_positive(self.block, "block")
        check_path(self.path)

    def ring_seq_multiple(self, ring_degree: int) -> int:
        return 2 * ring_degree * self.block  # whole blocks in each of the 2 x ring zigzag chunks


@dataclass(kw_only=True)
class StreamingOptions(_SinkWindowOptions):
    """Options of ``streaming``.

    Args:
        sink: attention-sink tokens at the start every streaming head reads.
        window: most recent tokens a streaming head reads (its own position included).
        retrieval_heads: KV-head indices (not query heads) that keep full attention; each brings its
            whole GQA group of query heads.
        block: block size of the sparse computation.
        path: ``auto``, ``naive``, ``gather``, ``banded``, ``chunked``, ``flex`` or ``triton``
            (see :class:`~longshard.models.attention.sparse_base.BlockSparseAttention`).
    """

    moved_options = {
        "learned_gates": "learned gates are the variant streaming_gated: use name: streaming_gated (options sink, "
                         "window, gate_l1, block, path).",
        "gate_l1": "gate_l1 is an option of the variant streaming_gated.",
    }

    retrieval_heads: list[int] = field(default_factory=list)

    def context_parallel(self) -> str | None:
        return "sparse_exchange"


@register_attention("streaming", StreamingOptions)
class StreamingAttention(BlockSparseAttention):
    """DuoAttention-style retrieval (full) and streaming (sink + window) heads."""

    def __init__(self, ctx: AttentionContext, opts: StreamingOptions) -> None:
        super().__init__(ctx, opts)
        field = f"model.attention[{ctx.layer_idx}].options.retrieval_heads"
        for h in opts.retrieval_heads:
            require(0 <= h < ctx.n_kv_heads, field, f"KV head {h} does not exist (the layer has {ctx.n_kv_heads} KV "
                    f"heads; retrieval_heads counts KV heads, each with its {ctx.n_heads // ctx.n_kv_heads} query "
                    "heads).", f"give KV-head indices 0..{ctx.n_kv_heads - 1}.")
        require(len(set(opts.retrieval_heads)) == len(opts.retrieval_heads), field,
                f"{opts.retrieval_heads} lists a KV head twice.", "list each KV head once.")
        group = ctx.n_heads // ctx.n_kv_heads
        stream_kv = torch.tensor([h not in opts.retrieval_heads for h in range(ctx.n_kv_heads)])
        self.register_buffer("streaming_H", stream_kv.repeat_interleave(group), persistent=False)
        self.covers_context = len(opts.retrieval_heads) > 0  # union over heads
        self.full = DenseAttention(ctx, DenseOptions())  # the retrieval heads
        self.supports_offload = not opts.retrieval_heads  # retrieval heads read every block: full KV

    def band_spec(self, n_blocks: int) -> BandFarSpec:
        """Sink + window on the streaming heads; retrieval heads are full heads (run dense)."""
        return sink_window_spec(self.block, self.streaming_H, self.opts.sink, self.opts.window)

    def full_heads_forward(self, q_BHSD, k_BHSD, v_BHSD, batch: AttentionBatch):
        return self.full(q_BHSD, k_BHSD, v_BHSD, batch)


@dataclass(kw_only=True)
class StreamingGatedOptions(_SinkWindowOptions):
    """Options of ``streaming_gated`` (DuoAttention's identification of retrieval heads).

    Args:
        sink: attention-sink tokens at the start the streaming branch reads.
        window: most recent tokens the streaming branch reads (its own position included).
        gate_l1: weight of the L1 penalty on alpha (added to the training loss).
        block: block size of the streaming branch's sparse computation.
        path: block-sparse path of the streaming branch (see ``streaming``).
    """

    gate_l1: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.gate_l1 >= 0, "gate_l1", "must be >= 0.")

    def context_parallel(self) -> str | None:
        return None  # the full branch of every head needs all keys: Ulysses only

    def tensor_parallel_problem(self) -> str | None:
        return "streaming_gated has per-KV-head gate parameters (alpha)"


@register_attention("streaming_gated", StreamingGatedOptions)
class StreamingGatedAttention(BlockSparseAttention):
    """Learned mixing per KV head between full and streaming (sink + window) attention."""

    supports_offload = False  # the full branch reads every block

    def __init__(self, ctx: AttentionContext, opts: StreamingGatedOptions) -> None:
        super().__init__(ctx, opts)
        self.alpha = nn.Parameter(torch.ones(ctx.n_kv_heads))
        self.full = DenseAttention(ctx, DenseOptions())  # the full branch

    def attention_flops_per_token(self, seq_len: int) -> float:
        # every head runs its full and its streaming branch
        return self.full.attention_flops_per_token(seq_len) + super().attention_flops_per_token(seq_len)

    def kept_fraction(self, seq_len: int) -> float:
        return 1.0  # the full branch reads every key

    def band_spec(self, n_blocks: int) -> BandFarSpec:
        """The streaming branch: sink + window on every head."""
        every = torch.ones(self.ctx.n_heads, dtype=torch.bool)
        return sink_window_spec(self.block, every, self.opts.sink, self.opts.window)

    def forward(self, q_BHSD, k_BHSD, v_BHSD, batch: AttentionBatch):
        streamed = super().forward(q_BHSD, k_BHSD, v_BHSD, batch)
        full = self.full(q_BHSD, k_BHSD, v_BHSD, batch)
        alpha = self.alpha.clamp(0, 1)
        # read by Transformer.aux_loss(); on all heads even when this rank runs a slice of them, so
        # every rank adds the same penalty (data parallel averages it back to one)
        self.last_aux_loss = self.opts.gate_l1 * alpha.sum()
        hs = self.head_slice or (0, self.ctx.n_heads)
        a = alpha.repeat_interleave(self.ctx.n_heads // self.ctx.n_kv_heads)[hs[0] : hs[1], None, None]
        return a * full + (1 - a) * streamed


@dataclass(kw_only=True)
class SlidingWindowOptions(AttentionOptions):
    """Options of ``sliding_window``.

    Args:
        window: most recent tokens every head reads (its own position included).
        sink: leading tokens every head also reads (0 = none).
        block: block size of the sparse computation.
        path: ``auto``, ``naive``, ``gather``, ``banded``, ``chunked``, ``flex`` or ``triton``
            (see :class:`~longshard.models.attention.sparse_base.BlockSparseAttention`).
    """

    window: int = 512
    sink: int = 0
    block: int = 64
    path: str = "auto"

    def __post_init__(self) -> None:
        require_positive(self.window, "window")
        require(self.sink >= 0, "sink", "must be >= 0.")
        require_positive(self.block, "block")
        check_path(self.path)

    def context_parallel(self) -> str | None:
        return "sparse_exchange"

    def ring_seq_multiple(self, ring_degree: int) -> int:
        return 2 * ring_degree * self.block  # whole blocks in each of the 2 x ring zigzag chunks


@register_attention("sliding_window", SlidingWindowOptions)
class SlidingWindowAttention(BlockSparseAttention):
    """Causal sliding-window softmax attention (optionally with sinks) on every head."""

    covers_context = False

    def __init__(self, ctx: AttentionContext, opts: SlidingWindowOptions) -> None:
        super().__init__(ctx, opts)

    def band_spec(self, n_blocks: int) -> BandFarSpec:
        every = torch.ones(self.ctx.n_heads, dtype=torch.bool)
        return sink_window_spec(self.block, every, self.opts.sink, self.opts.window)


def retrieval_assignment(model: nn.Module, threshold: float = 0.5) -> dict[int, list[int]]:
    """Per layer, the KV heads whose learned alpha exceeds ``threshold`` (the retrieval heads).

    Feed the result back as ``retrieval_heads`` of a ``streaming`` layer.
    """
    out: dict[int, list[int]] = {}
    for mod in model.modules():
        if isinstance(mod, StreamingGatedAttention):
            alpha = mod.alpha.detach().clamp(0, 1)
            out[mod.ctx.layer_idx] = [int(h) for h in torch.nonzero(alpha > threshold).flatten()]
    return out

