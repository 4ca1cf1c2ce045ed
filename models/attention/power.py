"""PowerAttention: a static block-sparse pattern whose receptive field doubles with every layer.

Query block ``i`` reads the ``local_blocks`` most recent key blocks (its own included), the first
``sink_blocks`` blocks, and every older block at a power-of-two distance: ``j = i - 2^k`` for
``k = 0, 1, 2, ...`` (Chen et al., 2025, "PowerAttention: Exponentially Scaling of Receptive Fields
for Effective Sparse Attention", at block granularity). A token therefore reaches any earlier block
in at most ``log2(n_blocks)`` hops through the layers — ``2^d`` blocks after ``d`` layers — while each
query block reads ``local_blocks + log2(i)`` blocks, a sliding window's cost plus a logarithm.

The same pattern on every head; it runs on the block-sparse family's general paths (``fused`` on
CPU, the Triton CSR kernels on CUDA, ``gather``, ``flex``, ``naive``) and over a ring through the sparsity-aware
exchange (only the blocks the pattern reads move).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from longshard.errors import require, require_positive
from longshard.kernels.block_sparse.pattern import SparsePattern
from longshard.models.attention.registry import AttentionContext, AttentionOptions, register_attention
from longshard.models.attention.sparse_base import BlockSparseAttention, check_path

POWER_PATHS = ("auto", "naive", "gather", "fused", "flex", "triton")  # no band + far form: far blocks move


@dataclass(kw_only=True)
class PowerOptions(AttentionOptions):
    """Options of ``power``.

    Args:
        block: block size in tokens.
        local_blocks: most recent blocks every query block reads (the diagonal block included).
        sink_blocks: leading blocks every query block also reads.
        path: ``auto`` (``triton`` on CUDA, ``fused`` on CPU), ``naive``, ``gather``, ``fused`` (query
            chunks with their kept blocks gathered through the fused CPU flash kernel), ``flex`` or
            ``triton``.
    """

    block: int = 64
    local_blocks: int = 4
    sink_blocks: int = 0
    path: str = "auto"

    def __post_init__(self) -> None:
        require_positive(self.block, "block")
        require_positive(self.local_blocks, "local_blocks")
        require(self.sink_blocks >= 0, "sink_blocks", f"must be >= 0, got {self.sink_blocks}.")
        check_path(self.path)
        require(self.path in POWER_PATHS, "path", f"{self.path!r}: power has no band + far form.",
                f"use one of: {', '.join(POWER_PATHS)}.")

    def context_parallel(self) -> str | None:
        return "sparse_exchange"

    def ring_seq_multiple(self, ring_degree: int) -> int:
        return 2 * ring_degree * self.block  # whole blocks in each of the 2 x ring zigzag chunks


def power_block_mask(n_blocks: int, opts: PowerOptions) -> torch.Tensor:
    """(n_blocks, n_blocks) bool: key blocks each query block reads (causal)."""
    i = torch.arange(n_blocks)[:, None]
    j = torch.arange(n_blocks)[None, :]
    d = i - j
    power_of_two = (d > 0) & ((d & (d - 1)) == 0)
    return (d >= 0) & ((d < opts.local_blocks) | power_of_two | (j < opts.sink_blocks))


@register_attention("power", PowerOptions)
class PowerAttention(BlockSparseAttention):
    """Causal block-sparse attention over a local band and power-of-two block distances (every head)."""

    covers_context = False  # one layer does not reach every block; layers together do

    def __init__(self, ctx: AttentionContext, opts: PowerOptions) -> None:
        super().__init__(ctx, opts)

    def build_pattern(self, n_blocks: int) -> SparsePattern:
        lo, hi = self.head_slice or (0, self.ctx.n_heads)
        mask = power_block_mask(n_blocks, self.opts)
        return SparsePattern(self.block, mask[None].expand(hi - lo, -1, -1).contiguous())
