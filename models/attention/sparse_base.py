"""Shared machinery of block-sparse variants: pattern caching and path dispatch."""

from __future__ import annotations

import math

import torch
from longshard.errors import require
from longshard.kernels.block_sparse import (
    SparsePattern,
    block_sparse_attention_gather,
    block_sparse_attention_naive,
)
from longshard.kernels.block_sparse.banded import BandFarSpec, band_far_attention
from longshard.kernels.block_sparse.flex import block_sparse_attention_flex, flex_available
from longshard.kernels.block_sparse.triton import (
    TRITON_BLOCKS,
    block_sparse_attention_triton,
    triton_block_ok,
)
from longshard.kernels.triton_support import triton_installed
from longshard.models.attention.registry import AttentionBatch, AttentionContext, CoreAttention

SPARSE_PATHS = ("auto", "naive", "gather", "banded", "flex", "triton")


def check_path(path: str) -> None:
    require(path in SPARSE_PATHS, "path", f"unknown block-sparse path {path!r}.",
            f"use one of: {', '.join(SPARSE_PATHS)}.")


def slice_band_spec(spec: BandFarSpec, start: int, stop: int) -> BandFarSpec:
    """The band + far spec of query heads [start, stop)."""
    cut = lambda t: None if t is None else t[start:stop]
    return BandFarSpec(spec.block, spec.band_blocks, cut(spec.far_HF), cut(spec.window_H), cut(spec.sink_H),
                       cut(spec.far_token_limit_H))


class BlockSparseAttention(CoreAttention):
    """Base of block-sparse variants: subclasses implement :meth:`build_pattern`.

    Paths: ``naive`` (full masked score matrix, the reference), ``gather`` (kept K/V blocks only,
    any pattern), ``banded`` (band + far blocks, for variants that define :meth:`band_spec`;
    the fastest CPU training path), ``flex`` (flex_attention BlockMask; CUDA forward+backward),
    ``triton`` (our per-head block-list kernel, forward+backward; CUDA, or the CPU interpreter),
    ``auto`` (on CUDA: triton when installed and the block is a kernel tile size, else flex; on
    CPU: banded, else gather, for training/prefill; naive when decoding).
    """

    def __init__(self, ctx: AttentionContext, block: int, path: str) -> None:
        super().__init__(ctx)
        require(path != "triton" or triton_block_ok(block), "block",
                f"path triton needs a block in {TRITON_BLOCKS} (the kernel tile), got {block}.",
                "change block or use path auto/gather.")
        self.block, self.path = block, path
        self._cache: dict[tuple[int, str], SparsePattern] = {}
        self.head_slice: tuple[int, int] | None = None

    def set_head_slice(self, start: int, stop: int) -> None:
        self.head_slice = (start, stop)
        self._cache.clear()

    def build_pattern(self, n_blocks: int) -> SparsePattern:  # pragma: no cover - interface
        raise NotImplementedError

    def band_spec(self, n_blocks: int) -> BandFarSpec | None:
        """The pattern as band + far blocks, when it has that shape (None = use gather)."""
        return None

    def pattern(self, n_blocks: int, device: torch.device) -> SparsePattern:
        """The (cached) pattern over ``n_blocks`` blocks on ``device``."""
        key = (n_blocks, str(device))
        if key not in self._cache:
            pat = self.build_pattern(n_blocks)
            if self.head_slice is not None:
                pat = pat.head_slice(*self.head_slice)
            self._cache[key] = pat.to(device)
        return self._cache[key]

    def resolve_path(self, q_BHSD: torch.Tensor, k_len: int) -> str:
        if self.path != "auto":
            return self.path
        if q_BHSD.shape[2] != k_len:
            return "naive"
        if q_BHSD.is_cuda and triton_installed() and triton_block_ok(self.block):
            return "triton"
        if q_BHSD.is_cuda and flex_available():
            return "flex"
        return "banded" if self.band_spec(1) is not None else "gather"

    def forward(
        self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        k_len = k_BHSD.shape[2]
        path = self.resolve_path(q_BHSD, k_len)
        if path == "banded":
            return self.banded_forward(q_BHSD, k_BHSD, v_BHSD, batch)
        pat = self.pattern(math.ceil(k_len / self.block), q_BHSD.device)
        fn = {
            "naive": block_sparse_attention_naive,
            "gather": block_sparse_attention_gather,
            "flex": block_sparse_attention_flex,
            "triton": block_sparse_attention_triton,
        }[path]
        return fn(q_BHSD, k_BHSD, v_BHSD, pat, batch.doc_ids_BS)

    def banded_forward(
        self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        spec = self.band_spec(math.ceil(k_BHSD.shape[2] / self.block))
        if spec is not None and self.head_slice is not None:
            spec = slice_band_spec(spec, *self.head_slice)
        if spec is None:
            raise ValueError(f"{type(self).__name__} has no band + far form: use path gather")
        return band_far_attention(q_BHSD, k_BHSD, v_BHSD, spec, batch.doc_ids_BS)
