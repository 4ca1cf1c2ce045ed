"""Dynamic Mask Attention (DMA; "Trainable Dynamic Mask Sparse Attention").

A content-aware mask from the values: per KV head, every key j gets the logit bias
``A_h * softplus(Delta_h . v_j)``; each query block keeps its own block and the ``keep_blocks - 1``
earlier key blocks of highest mean detached bias, and attends softmax(q.k * scale + bias) over those
keys. A, Delta and the values train through the kept keys' bias; the top-k passes no gradient. See
:mod:`longshard.kernels.dma`. The selection of a head needs all of its keys: Ulysses, not the ring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from longshard.errors import require, require_positive
from longshard.kernels.block_sparse.triton import TRITON_BLOCKS, triton_block_ok, triton_runs
from longshard.kernels.dma import dma_attention_gather, dma_attention_naive, dma_attention_triton, dma_kept_fraction
from longshard.models.attention.registry import (
    AttentionBatch,
    AttentionContext,
    AttentionOptions,
    CoreAttention,
    dense_attention_flops,
    register_attention,
)
from torch import nn


@dataclass(kw_only=True)
class DMAOptions(AttentionOptions):
    """Options of ``dma``.

    Args:
        block: tokens per block (the unit the top-w selection is rounded to).
        keep_blocks: key blocks each query block reads, its own included (w = keep_blocks x block keys).
        a_init: initial A of every KV head. 0 (the default) starts with no bias, so a converted dense
            checkpoint differs only by the keys it no longer reads; A then trains.
        delta_std: standard deviation of Delta's initial values.
        path: ``auto`` (``triton`` on CUDA when ``block`` is a Triton tile, else ``gather``), ``triton``
            (the block-sparse CSR kernels with the bias as a per-key logit term), ``gather`` (PyTorch,
            query-block runs under checkpointing) or ``naive`` (the full-matrix reference).
    """

    block: int = 64
    keep_blocks: int = 8
    a_init: float = 0.0
    delta_std: float = 0.02
    path: str = "auto"

    def __post_init__(self) -> None:
        require_positive(self.block, "block")
        require_positive(self.keep_blocks, "keep_blocks")
        require(self.delta_std >= 0, "delta_std", f"must be >= 0, got {self.delta_std}.")
        require(self.path in ("auto", "triton", "gather", "naive"), "path", f"unknown path {self.path!r}.",
                "use auto, triton, gather or naive.")
        require(self.path != "triton" or triton_block_ok(self.block), "block",
                f"path=triton needs block in {TRITON_BLOCKS}, got {self.block}.", "change block or use path=gather.")

    def tensor_parallel_problem(self) -> str | None:
        return "dma has per-KV-head parameters (A, Delta)"


@register_attention("dma", DMAOptions)
class DMAAttention(CoreAttention):
    """Dynamic Mask Attention: value-derived key bias, top blocks per query block by that bias."""

    covers_context = False  # the kept blocks are a budget, not a cover

    def __init__(self, ctx: AttentionContext, opts: DMAOptions) -> None:
        super().__init__(ctx, opts)
        self.scale = 1.0 / math.sqrt(ctx.head_dim)
        self.a = nn.Parameter(torch.empty(ctx.n_kv_heads))
        self.delta = nn.Parameter(torch.empty(ctx.n_kv_heads, ctx.head_dim))
        self.kv_slice: tuple[int, int] | None = None
        self.reset_variant_parameters()

    @torch.no_grad()
    def reset_variant_parameters(self) -> None:
        """A = a_init, Delta ~ N(0, delta_std^2)."""
        self.a.fill_(self.opts.a_init)
        self.delta.normal_(0.0, self.opts.delta_std)

    def set_head_slice(self, start: int, stop: int) -> None:
        """Run query heads [start, stop) (Ulysses): the A and Delta of their KV heads are used. The bias and
        the selection depend on a KV head's values only, so a slice may hold part of a GQA group (Ulysses
        then replicates its KV head)."""
        G = self.ctx.n_heads // self.ctx.n_kv_heads
        self.kv_slice = (start // G, -(-stop // G))

    def resolve_path(self, q_BHSD: torch.Tensor) -> str:
        """The path ``auto`` stands for on this input: Triton on CUDA where it can run, else gather."""
        if self.opts.path != "auto":
            return self.opts.path
        return "triton" if triton_runs(q_BHSD, self.opts.block) else "gather"

    def forward(self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch):
        fn = {"naive": dma_attention_naive, "gather": dma_attention_gather,
              "triton": dma_attention_triton}[self.resolve_path(q_BHSD)]
        a, delta = self.a, self.delta
        if self.kv_slice is not None:
            a, delta = a[self.kv_slice[0] : self.kv_slice[1]], delta[self.kv_slice[0] : self.kv_slice[1]]
        return fn(q_BHSD, k_BHSD, v_BHSD, a, delta, self.opts.block, self.opts.keep_blocks, self.scale,
                  batch.doc_ids_BS)

    def kept_fraction(self, seq_len: int) -> float:
        return dma_kept_fraction(seq_len, self.opts.block, self.opts.keep_blocks)

    def attention_flops_per_token(self, seq_len: int) -> float:
        """The keys each query reads (its kept blocks), plus the bias: one D-dot per key and head."""
        keys = self.kept_fraction(seq_len) * (seq_len + 1) / 2
        bias = 2.0 * self.ctx.n_kv_heads * self.ctx.head_dim
        return dense_attention_flops(self.ctx.n_heads, self.ctx.head_dim, seq_len, keys) + bias
