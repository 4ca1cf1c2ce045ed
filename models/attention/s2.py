"""S2-Attention: heterogeneous head-sharded block-sparse attention.

A shard ``h`` reads the ``local_blocks`` most recent key blocks, the first ``sink_blocks``
blocks, and every older block ``j`` of its phase, ``step = max(1, vert_stride // n_query_heads)``
(under tensor parallelism ``h`` stays the global index). Two conventions exist (option ``phase_rule``):

* ``phi3`` (default): ``(j + h*step + offset + 1) % vert_stride == 0`` — the block-sparse attention of
  Phi-3-small (``get_block_mask``, no offset there) and vLLM's blocksparse kernels.
* ``dkernel``: ``(j + h*step + offset) % vert_stride == 0`` — DKernel's ``get_sparse_attn_mask``
  (``offset`` is its ``head_sliding_offset``; block 0 is read by head 0 when the offset is 0).

``phi3`` with ``offset = o`` equals ``dkernel`` with ``offset = o + 1``: a model trained with one library
keeps its blocks when the rule (or the offset) is set to that library's.

Shards (option ``shard``):

* ``kv``: ``h`` is the KV head; the query heads of a GQA group share its pattern, so each KV
  head's cache keeps ``1 / vert_stride`` of the far blocks. The heads of a layer cover every block
  when the KV heads' phases hit every residue (at least ``vert_stride`` KV heads when the step is 1).
* ``query``: ``h`` is the query head (DKernel's per-head layout for GQA models); coverage is
  checked over query heads, and a KV head's cache keeps the union of its query heads' blocks: with
  ``G`` query heads per KV head, up to ``G / vert_stride`` of the far blocks (Qwen2.5-0.5B: 14 / 2
  heads, stride 8 -> 7 of 8 residues per KV head: full coverage, but little KV saving; compute
  still reads ``1 / vert_stride`` per query head). Offloaded decoding fetches that union.
* ``auto`` (default): ``kv`` when the KV heads cover the stride, else ``query``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from longshard.errors import ConfigError, require, require_positive
from longshard.kernels.block_sparse.pattern import BandFarSpec
from longshard.models.attention.registry import AttentionContext, AttentionOptions, register_attention
from longshard.models.attention.sparse_base import BlockSparseAttention, check_path


@dataclass(kw_only=True)
class S2Options(AttentionOptions):
    """Options of ``s2``.

    Args:
        block: block size in tokens.
        local_blocks: most recent blocks every head keeps (the diagonal block included).
        vert_stride: stride of the older blocks a head keeps.
        sink_blocks: leading blocks every head keeps.
        heterogeneous: shift the stride phase per shard (False = same phase for all heads).
        offset: global phase offset (DKernel's ``head_sliding_offset`` under ``phase_rule: dkernel``).
        phase_rule: ``phi3`` (Phi-3-small / vLLM: ``(j + h*step + offset + 1) % vert_stride == 0``) or
            ``dkernel`` (DKernel: ``(j + h*step + offset) % vert_stride == 0``).
        shard: ``kv``, ``query`` or ``auto`` (see the module docstring).
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
    phase_rule: str = "phi3"
    shard: str = "auto"
    dense_every_n_layers: int = 0
    allow_incomplete_coverage: bool = False
    path: str = "auto"

    def __post_init__(self) -> None:
        for name in ("block", "local_blocks", "vert_stride"):
            require_positive(getattr(self, name), name)
        require(self.sink_blocks >= 0, "sink_blocks", f"must be >= 0, got {self.sink_blocks}.")
        require(self.dense_every_n_layers >= 0, "dense_every_n_layers", "must be >= 0.")
        require(self.shard in S2_SHARDS, "shard", f"{self.shard!r} is not one of {', '.join(S2_SHARDS)}.",
                "kv: a pattern per KV head; query: per query head; auto: kv when the KV heads cover the stride.")
        require(self.phase_rule in S2_PHASE_RULES, "phase_rule",
                f"{self.phase_rule!r} is not one of {', '.join(S2_PHASE_RULES)}.",
                "phi3: Phi-3-small's / vLLM's rule (j + h*step + offset + 1); "
                "dkernel: DKernel's (j + h*step + offset).")
        check_path(self.path)

    def context_parallel(self) -> str | None:
        return "sparse_exchange"

    def ring_seq_multiple(self, ring_degree: int) -> int:
        return 2 * ring_degree * self.block  # whole blocks in each of the 2 x ring zigzag chunks

    def layer_spec(self, layer_idx: int) -> tuple[str, dict] | None:
        return ("dense", {}) if s2_is_dense_layer(layer_idx, self) else None  # the hybrid schedule's dense layers


S2_SHARDS = ("auto", "kv", "query")
S2_PHASE_RULES = ("phi3", "dkernel")


def s2_phase(head: int, n_query_heads: int, opts: S2Options) -> int:
    """Residue r such that shard ``head`` keeps older blocks with j % vert_stride == r:
    ``(j + head * step + offset [+ 1 under phase_rule phi3]) % vert_stride == 0``,
    ``step = max(1, vert_stride // n_query_heads)``."""
    step = max(1, opts.vert_stride // n_query_heads) if opts.heterogeneous else 0
    shift = 1 if opts.phase_rule == "phi3" else 0
    return (-(head * step + opts.offset + shift)) % opts.vert_stride


def _missing(phases: list[int], opts: S2Options) -> list[int]:
    return [r for r in range(opts.vert_stride) if r not in set(phases)]


def s2_shard_mode(n_kv_heads: int, opts: S2Options, n_query_heads: int | None = None) -> str:
    """``kv`` or ``query``: the option, or for ``auto`` ``kv`` when the KV heads' phases cover the stride."""
    if opts.shard != "auto":
        return opts.shard
    n_q = n_query_heads or n_kv_heads
    return "kv" if not _missing([s2_phase(h, n_q, opts) for h in range(n_kv_heads)], opts) else "query"


def s2_head_phases(n_kv_heads: int, opts: S2Options, n_query_heads: int | None = None) -> list[int]:
    """The phase of every query head: its KV head's (``kv`` shards) or its own (``query`` shards).
    ``n_query_heads`` defaults to ``n_kv_heads`` (one query head per KV head)."""
    n_q = n_query_heads or n_kv_heads
    group = n_q // n_kv_heads
    if s2_shard_mode(n_kv_heads, opts, n_q) == "kv":
        return [s2_phase(h // group, n_q, opts) for h in range(n_q)]
    return [s2_phase(h, n_q, opts) for h in range(n_q)]


def s2_band_spec(n_blocks: int, n_kv_heads: int, opts: S2Options, n_query_heads: int | None = None) -> BandFarSpec:
    """The S2 pattern, the one description of it: a band of ``local_blocks`` blocks, and per query
    head the far blocks of its phase (``j % vert_stride == phase``) plus the sink blocks; H is
    ``n_query_heads`` (default ``n_kv_heads``)."""
    j = torch.arange(n_blocks)
    far = [j[((j % opts.vert_stride) == r) | (j < opts.sink_blocks)]
           for r in s2_head_phases(n_kv_heads, opts, n_query_heads)]
    width = max(len(f) for f in far)
    far_HF = torch.stack([torch.cat([f, f.new_full((width - len(f),), -1)]) for f in far])
    return BandFarSpec(opts.block, opts.local_blocks, far_HF)


def s2_kept_blocks(n_blocks: int, n_kv_heads: int, opts: S2Options, n_query_heads: int | None = None) -> torch.Tensor:
    """(H, n_blocks, n_blocks) bool: key blocks each query head's query block keeps (causal), from
    :func:`s2_band_spec`."""
    return s2_band_spec(n_blocks, n_kv_heads, opts, n_query_heads).block_mask(n_blocks)


def s2_uncovered_residues(n_kv_heads: int, opts: S2Options, n_query_heads: int | None = None) -> list[int]:
    """Residues mod vert_stride no head keeps: blocks older than the local window there are lost."""
    return _missing(s2_head_phases(n_kv_heads, opts, n_query_heads), opts)


def check_coverage(n_blocks: int, n_kv_heads: int, opts: S2Options, n_query_heads: int | None = None) -> bool:
    """True when the union over heads of the kept blocks is the full causal triangle."""
    kept = s2_kept_blocks(n_blocks, n_kv_heads, opts, n_query_heads).any(0)
    return bool(kept[torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril()].all())


def s2_is_dense_layer(layer_idx: int, opts: S2Options) -> bool:
    n = opts.dense_every_n_layers
    return n > 0 and (layer_idx + 1) % n == 0


@register_attention("s2", S2Options)
class S2Attention(BlockSparseAttention):
    """S2 heterogeneous head-sharded sparse attention (the hybrid schedule's dense layers are built as
    ``dense`` from :meth:`S2Options.layer_spec`)."""

    def __init__(self, ctx: AttentionContext, opts: S2Options) -> None:
        super().__init__(ctx, opts)
        self.shard = s2_shard_mode(ctx.n_kv_heads, opts, ctx.n_heads)
        missing = s2_uncovered_residues(ctx.n_kv_heads, opts, ctx.n_heads)
        self.covers_context = not missing
        if not self.covers_context and not (opts.allow_incomplete_coverage or ctx.context_covered_elsewhere):
            heads = f"{ctx.n_kv_heads} KV heads" if self.shard == "kv" else f"{ctx.n_heads} query heads"
            raise ConfigError(
                f"model.attention[{ctx.layer_idx}].options.vert_stride",
                f"{heads} ({self.shard} shards) with vert_stride={opts.vert_stride} leave key blocks j with "
                f"j % {opts.vert_stride} in {missing} unread by every head beyond the local window.",
                ("use shard=query (or auto), " if self.shard == "kv" else
                 f"lower vert_stride to at most {ctx.n_heads} (the query heads), ")
                + "add dense heads (mixed), or set allow_incomplete_coverage=true.",
            )

    def band_spec(self, n_blocks: int) -> BandFarSpec:
        return s2_band_spec(n_blocks, self.ctx.n_kv_heads, self.opts, self.ctx.n_heads)

