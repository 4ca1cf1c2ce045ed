"""Block-sparse softmax attention with per-head patterns: naive reference, gather (CPU training), flex, Triton."""

from longshard.kernels.block_sparse.gather import block_sparse_attention_gather, kept_block_index
from longshard.kernels.block_sparse.naive import block_sparse_attention_naive
from longshard.kernels.block_sparse.pattern import SparsePattern, dense_mask, token_keep
from longshard.kernels.block_sparse.triton import block_sparse_attention_triton, block_sparse_attention_triton_mask

__all__ = [
    "SparsePattern",
    "block_sparse_attention_gather",
    "block_sparse_attention_naive",
    "block_sparse_attention_triton",
    "block_sparse_attention_triton_mask",
    "dense_mask",
    "kept_block_index",
    "token_keep",
]
