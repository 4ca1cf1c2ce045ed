"""Shared machinery of block-sparse variants: pattern caching and path dispatch."""

from __future__ import annotations

import math

import torch
from longshard.errors import require
from longshard.kernels.attention.fused_cpu import fused_cpu_ops
from longshard.kernels.attention.naive import attention_gathered
from longshard.kernels.block_sparse import (
    SparsePattern,
    block_sparse_attention_gather,
    block_sparse_attention_naive,
)
from longshard.kernels.block_sparse.banded import BandFarSpec, band_far_attention
from longshard.kernels.block_sparse.chunked import band_far_attention_chunked
from longshard.kernels.block_sparse.flex import block_sparse_attention_flex, flex_available
from longshard.kernels.block_sparse.gathered import block_sparse_attention_fused
from longshard.kernels.block_sparse.pattern import kept_first, token_keep
from longshard.kernels.block_sparse.triton import (
    TRITON_BLOCKS,
    block_sparse_attention_triton,
    triton_block_ok,
    triton_runs,
)
from longshard.models.attention.registry import (
    AttentionBatch,
    AttentionContext,
    AttentionOptions,
    CoreAttention,
    DecodePlan,
)

SPARSE_PATHS = ("auto", "naive", "gather", "fused", "banded", "chunked", "flex", "triton")
BAND_PATHS = {"banded": band_far_attention, "chunked": band_far_attention_chunked}


def check_path(path: str) -> None:
    require(path in SPARSE_PATHS, "path", f"unknown block-sparse path {path!r}.",
            f"use one of: {', '.join(SPARSE_PATHS)}.")


class BlockSparseAttention(CoreAttention):
    """Base of block-sparse variants: subclasses describe their pattern once, in :meth:`band_spec`
    (band + far blocks, token windows/sinks, full heads); every path derives what it needs from it.
    A pattern with no band form overrides :meth:`build_pattern` instead (then only the
    non-band paths run).

    Paths: ``naive`` (full masked score matrix, the reference), ``gather`` (kept K/V blocks only,
    any pattern), ``banded`` (band + far blocks as block matmuls, for variants that define
    :meth:`band_spec`), ``chunked`` (band + far blocks as one fused SDPA call per chunk of query
    blocks; the fastest CPU training path), ``flex`` (flex_attention BlockMask; CUDA
    forward+backward), ``triton`` (our per-head block-list kernel, forward+backward; CUDA, or the
    CPU interpreter), ``auto`` (on CUDA: triton when installed and the block is a kernel tile
    size, else flex; on CPU: chunked, else gather, for training/prefill; naive when decoding).
    """

    supports_offload = True

    def __init__(self, ctx: AttentionContext, opts: AttentionOptions) -> None:
        """Args: ``opts`` carries the variant's ``block`` (tokens per block) and ``path``."""
        super().__init__(ctx, opts)
        block, path = opts.block, opts.path
        require(path != "triton" or triton_block_ok(block), "block",
                f"path triton needs a block in {TRITON_BLOCKS} (the kernel tile), got {block}.",
                "change block or use path auto/gather.")
        self.block, self.path = block, path
        self._cache: dict[tuple[int, str], SparsePattern] = {}
        self._decode_pat: tuple[tuple[int, str], SparsePattern] | None = None
        self.head_slice: tuple[int, int] | None = None

    def set_head_slice(self, start: int, stop: int) -> None:
        self.head_slice = (start, stop)
        self._cache.clear()
        self._decode_pat = None

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Dense causal FLOPs times the kept share of causal (query block, key block) pairs."""
        return self.kept_fraction(seq_len) * super().attention_flops_per_token(seq_len)

    def kept_fraction(self, seq_len: int) -> float:
        """Kept share of causal (query block, key block) pairs of the pattern at ``seq_len``."""
        return self.pattern(math.ceil(seq_len / self.block), torch.device("cpu")).kept_fraction()

    def band_spec(self, n_blocks: int) -> BandFarSpec | None:
        """The layer's pattern over ``n_blocks`` blocks as band + far blocks, all of its query heads
        (None: no band form; then :meth:`build_pattern` is overridden)."""
        return None

    def local_band_spec(self, n_blocks: int) -> BandFarSpec | None:
        """:meth:`band_spec` restricted to the heads this module runs (:meth:`set_head_slice`)."""
        spec = self.band_spec(n_blocks)
        return spec if spec is None or self.head_slice is None else spec.head_slice(*self.head_slice)

    def build_pattern(self, n_blocks: int) -> SparsePattern:
        """The :class:`SparsePattern` of this module's heads, derived from :meth:`band_spec`.

        Override only for a pattern with no band form; the override must honour ``head_slice``.
        """
        spec = self.local_band_spec(n_blocks)
        if spec is None:
            raise NotImplementedError(f"{type(self).__name__} defines neither band_spec nor build_pattern")
        return spec.to_pattern(n_blocks)

    def pattern(self, n_blocks: int, device: torch.device) -> SparsePattern:
        """The (cached) pattern over ``n_blocks`` blocks on ``device``."""
        key = (n_blocks, str(device))
        if key not in self._cache:
            self._cache[key] = self.build_pattern(n_blocks).to(device)
        return self._cache[key]

    def resolve_path(self, q_BHSD: torch.Tensor, k_len: int) -> str:
        if self.path != "auto":
            return self.path
        if q_BHSD.shape[2] != k_len:
            return "naive"
        if triton_runs(q_BHSD, self.block):
            return "triton"
        if q_BHSD.is_cuda and flex_available():
            return "flex"
        if self.band_spec(1) is not None:
            return "chunked"
        return "fused" if q_BHSD.device.type == "cpu" and fused_cpu_ops() is not None else "gather"

    def forward(
        self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        k_len = k_BHSD.shape[2]
        path = self.resolve_path(q_BHSD, k_len)
        if path in BAND_PATHS:
            return self.banded_forward(q_BHSD, k_BHSD, v_BHSD, batch, BAND_PATHS[path])
        pat = self.pattern(math.ceil(k_len / self.block), q_BHSD.device)
        fn = {
            "naive": block_sparse_attention_naive,
            "gather": block_sparse_attention_gather,
            "fused": block_sparse_attention_fused,
            "flex": block_sparse_attention_flex,
            "triton": block_sparse_attention_triton,
        }[path]
        return fn(q_BHSD, k_BHSD, v_BHSD, pat, batch.doc_ids_BS, scale=self.softmax_scale)

    def banded_forward(
        self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch,
        fn=band_far_attention,
    ) -> torch.Tensor:
        """The band + far form through ``fn`` (:func:`band_far_attention` or the chunked form); heads
        with full attention (``full_H``) run through :meth:`full_heads_forward`."""
        spec = self.local_band_spec(math.ceil(k_BHSD.shape[2] / self.block))
        if spec is None:
            raise ValueError(f"{type(self).__name__} has no band + far form: use path gather")
        if not spec.has_full_heads():
            return fn(q_BHSD, k_BHSD, v_BHSD, spec, batch.doc_ids_BS, scale=self.softmax_scale)
        H, Hkv = q_BHSD.shape[1], k_BHSD.shape[1]
        full_q = spec.full_H.cpu()
        full_kv = full_q[:: H // Hkv]
        if not bool((full_q.view(Hkv, -1) == full_kv[:, None]).all()):
            raise ValueError("full-attention heads must be whole GQA groups")
        band_q = ~full_q
        fq, fkv = full_q.to(q_BHSD.device), full_kv.to(q_BHSD.device)  # one copy each per call
        parts = [self.full_heads_forward(q_BHSD[:, fq], k_BHSD[:, fkv], v_BHSD[:, fkv], batch)]
        if band_q.any():
            parts.append(fn(q_BHSD[:, ~fq], k_BHSD[:, ~fkv], v_BHSD[:, ~fkv], spec.select_heads(band_q),
                            batch.doc_ids_BS, scale=self.softmax_scale))
        order = torch.cat([torch.nonzero(full_q).flatten(), torch.nonzero(band_q).flatten()])
        return torch.cat(parts, dim=1)[:, torch.argsort(order).to(q_BHSD.device)]

    def full_heads_forward(
        self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        """Dense causal attention of the spec's full heads (variants whose spec has ``full_H``)."""
        raise NotImplementedError(f"{type(self).__name__} declares full heads but no dense core for them")

    # --- offloaded decoding (see longshard.models.offload) ------------------------------------
    def _decode_pattern(self, k_len: int, device: torch.device) -> SparsePattern:
        """The pattern covering ``k_len`` keys, rebuilt only when the block count changes."""
        n_all = math.ceil(k_len / self.block)
        held = self._decode_pat
        if held is None or held[0] != (n_all, str(device)):
            self._decode_pat = ((n_all, str(device)), self.build_pattern(n_all).to(device))
        return self._decode_pat[1]

    @torch.no_grad()
    def decode_plan(self, q_BH1D: torch.Tensor, kbar_BKND: torch.Tensor, k_len: int) -> DecodePlan:
        """Complete key blocks the query block of position ``k_len - 1`` reads (union over a GQA group)."""
        B, H = q_BH1D.shape[:2]
        Hkv, n_complete = kbar_BKND.shape[1], kbar_BKND.shape[2]
        pat = self._decode_pattern(k_len, q_BH1D.device)
        row_HN = pat.block_mask_HQN[:, (k_len - 1) // self.block, :n_complete]
        row_KN = row_HN.view(Hkv, H // Hkv, n_complete).any(1)
        width = max(int(row_KN.sum(-1).max()) if n_complete else 0, 1)
        idx = kept_first(row_KN, width)  # listed blocks first, ascending
        ok = torch.gather(row_KN, 1, idx)
        blocks = torch.where(ok, idx, -1)
        return DecodePlan(blocks[None].expand(B, -1, -1))

    def attend_blocks(self, q_BH1D: torch.Tensor, k_BKLD: torch.Tensor, v_BKLD: torch.Tensor,
                      kpos_BKL: torch.Tensor, bias_BKL: torch.Tensor | None, k_len: int) -> torch.Tensor:
        """Attention of one decoding query over gathered keys (positions ``kpos``, -1 = padding)."""
        H, Hkv = q_BH1D.shape[1], k_BKLD.shape[1]
        pat = self._decode_pattern(k_len, q_BH1D.device)
        kpos = kpos_BKL.repeat_interleave(H // Hkv, dim=1)  # (B, H, L)
        heads = torch.arange(H, device=kpos.device)[None, :, None]
        keep = token_keep(pat, torch.full_like(kpos, k_len - 1), kpos.clamp_min(0), heads) & (kpos >= 0)
        return attention_gathered(q_BH1D, k_BKLD, v_BKLD, keep, bias_BKL, self.softmax_scale)
