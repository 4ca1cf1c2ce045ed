"""S2-Attention: heterogeneous head-sharded block-sparse attention.

Each KV head ``h`` reads the ``local_blocks`` most recent key blocks, the first ``sink_blocks``
blocks, and every older block ``j`` with ``(j + h*step + offset) % vert_stride == 0`` where
``step = max(1, vert_stride // n_kv_heads)`` (DKernel's rule). Phases differ per head, so the
heads of a layer jointly cover every block when there are at least ``vert_stride`` KV heads.
Query heads share the pattern of their KV head (GQA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from longshard.errors import ConfigError, require, require_positive
from longshard.kernels.block_sparse import SparsePattern
from longshard.kernels.block_sparse.banded import BandFarSpec
from longshard.models.attention.dense import DenseAttention, DenseOptions
from longshard.models.attention.registry import AttentionContext, register_attention
from longshard.models.attention.sparse_base import BlockSparseAttention, check_path


@dataclass(kw_only=True)
class S2Options:
    """Options of ``s2``.

    Args:
        block: block size in tokens.
        local_blocks: most recent blocks every head keeps (the diagonal block included).
        vert_stride: stride of the older blocks a head keeps.
        sink_blocks: leading blocks every head keeps.
        heterogeneous: shift the stride phase per KV head (False = same shard for all heads).
        offset: global phase offset.
        dense_every_n_layers: >0 makes layers with ``(layer_idx + 1) % n == 0`` dense (hybrid).
        allow_incomplete_coverage: accept heads whose union misses blocks.
        path: ``auto``, ``naive``, ``gather``, ``banded``, ``chunked``, ``flex`` or ``triton``
            (see :class:`~longshard.models.attention.sparse_base.BlockSparseAttention`).
    """

    block: int = 64
    local_blocks: int = 16
    vert_stride: int = 8
    sink_blocks: int = 0
    heterogeneous: bool = True
    offset: int = 0
    dense_every_n_layers: int = 0
    allow_incomplete_coverage: bool = False
    path: str = "auto"

    def __post_init__(self) -> None:
        for name in ("block", "local_blocks", "vert_stride"):
            require_positive(getattr(self, name), name)
        require(self.sink_blocks >= 0, "sink_blocks", f"must be >= 0, got {self.sink_blocks}.")
        require(self.dense_every_n_layers >= 0, "dense_every_n_layers", "must be >= 0.")
        check_path(self.path)


def s2_phase(kv_head: int, n_kv_heads: int, opts: S2Options) -> int:
    """Residue r such that KV head ``kv_head`` keeps older blocks with j % vert_stride == r."""
    step = max(1, opts.vert_stride // n_kv_heads) if opts.heterogeneous else 0
    return (-(kv_head * step + opts.offset)) % opts.vert_stride


def s2_kept_blocks(n_blocks: int, n_kv_heads: int, opts: S2Options) -> torch.Tensor:
    """(Hkv, n_blocks, n_blocks) bool: key blocks each KV head's query block keeps (causal)."""
    i = torch.arange(n_blocks)[:, None]
    j = torch.arange(n_blocks)[None, :]
    causal = j <= i
    base = (i - j < opts.local_blocks) | (j < opts.sink_blocks)
    out = []
    for h in range(n_kv_heads):
        strided = (j % opts.vert_stride) == s2_phase(h, n_kv_heads, opts)
        out.append(causal & (base | strided))
    return torch.stack(out)


def s2_uncovered_residues(n_kv_heads: int, opts: S2Options) -> list[int]:
    """Residues mod vert_stride no KV head keeps: blocks older than the local window there are lost."""
    phases = {s2_phase(h, n_kv_heads, opts) for h in range(n_kv_heads)}
    return [r for r in range(opts.vert_stride) if r not in phases]


def check_coverage(n_blocks: int, n_kv_heads: int, opts: S2Options) -> bool:
    """True when the union over heads of the kept blocks is the full causal triangle."""
    kept = s2_kept_blocks(n_blocks, n_kv_heads, opts).any(0)
    return bool(kept[torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril()].all())


def s2_is_dense_layer(layer_idx: int, opts: S2Options) -> bool:
    n = opts.dense_every_n_layers
    return n > 0 and (layer_idx + 1) % n == 0


@register_attention("s2", S2Options)
class S2Attention(BlockSparseAttention):
    """S2 heterogeneous head-sharded sparse attention (dense on the hybrid schedule's layers)."""

    def __init__(self, ctx: AttentionContext, opts: S2Options) -> None:
        super().__init__(ctx, opts.block, opts.path)
        self.opts = opts
        self.dense = DenseAttention(ctx, DenseOptions()) if s2_is_dense_layer(ctx.layer_idx, opts) else None
        self.covers_context = self.dense is not None or not s2_uncovered_residues(ctx.n_kv_heads, opts)
        self.supports_offload = self.dense is None  # hybrid schedule's dense layers keep their full KV
        if not self.covers_context and not (opts.allow_incomplete_coverage or ctx.context_covered_elsewhere):
            missing = s2_uncovered_residues(ctx.n_kv_heads, opts)
            raise ConfigError(
                f"model.attention[{ctx.layer_idx}].options.vert_stride",
                f"{ctx.n_kv_heads} KV heads with vert_stride={opts.vert_stride} leave key blocks j with "
                f"j % {opts.vert_stride} in {missing} unread by every head beyond the local window.",
                "use at least vert_stride KV heads, lower vert_stride, add dense heads (mixed), "
                "or set allow_incomplete_coverage=true.",
            )

    def attention_flops_per_token(self, seq_len: int) -> float:
        if self.dense is not None:  # a dense layer of the hybrid schedule
            return self.dense.attention_flops_per_token(seq_len)
        return super().attention_flops_per_token(seq_len)

    def band_spec(self, n_blocks: int) -> BandFarSpec:
        o, kv = self.opts, self.ctx.n_kv_heads
        j = torch.arange(n_blocks)
        far = []
        for h in range(kv):
            sel = j[((j % o.vert_stride) == s2_phase(h, kv, o)) | (j < o.sink_blocks)]
            far.append(sel)
        width = max(len(f) for f in far)
        far_KF = torch.stack([torch.cat([f, f.new_full((width - len(f),), -1)]) for f in far])
        return BandFarSpec(self.block, o.local_blocks, far_KF.repeat_interleave(self.ctx.n_heads // kv, dim=0))

    def build_pattern(self, n_blocks: int) -> SparsePattern:
        kv = s2_kept_blocks(n_blocks, self.ctx.n_kv_heads, self.opts)
        group = self.ctx.n_heads // self.ctx.n_kv_heads
        return SparsePattern(self.block, kv.repeat_interleave(group, dim=0))

    def forward(self, q_BHSD, k_BHSD, v_BHSD, batch):
        if self.dense is not None:
            return self.dense(q_BHSD, k_BHSD, v_BHSD, batch)
        return super().forward(q_BHSD, k_BHSD, v_BHSD, batch)
