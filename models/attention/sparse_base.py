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
from longshard.kernels.block_sparse.flex import block_sparse_attention_flex, flex_available
from longshard.models.attention.registry import AttentionBatch, AttentionContext, CoreAttention

SPARSE_PATHS = ("auto", "naive", "gather", "flex")


def check_path(path: str) -> None:
    require(path in SPARSE_PATHS, "path", f"unknown block-sparse path {path!r}.",
            f"use one of: {', '.join(SPARSE_PATHS)}.")


class BlockSparseAttention(CoreAttention):
    """Base of block-sparse variants: subclasses implement :meth:`build_pattern`.

    Paths: ``naive`` (full masked score matrix, the reference), ``gather`` (kept K/V blocks only,
    trainable on CPU), ``flex`` (flex_attention BlockMask; CUDA forward+backward), ``auto``
    (flex on CUDA, gather for training/prefill on CPU, naive for decoding steps).
    """

    def __init__(self, ctx: AttentionContext, block: int, path: str) -> None:
        super().__init__(ctx)
        self.block, self.path = block, path
        self._cache: dict[tuple[int, str], SparsePattern] = {}

    def build_pattern(self, n_blocks: int) -> SparsePattern:  # pragma: no cover - interface
        raise NotImplementedError

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
        if q_BHSD.is_cuda and flex_available():
            return "flex"
        return "gather"

    def forward(
        self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        k_len = k_BHSD.shape[2]
        pat = self.pattern(math.ceil(k_len / self.block), q_BHSD.device)
        path = self.resolve_path(q_BHSD, k_len)
        fn = {
            "naive": block_sparse_attention_naive,
            "gather": block_sparse_attention_gather,
            "flex": block_sparse_attention_flex,
        }[path]
        return fn(q_BHSD, k_BHSD, v_BHSD, pat, batch.doc_ids_BS)
