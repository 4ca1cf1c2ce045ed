"""Dynamic Mask Attention (DMA): value-derived key bias, block selection, naive reference and gather path."""

from longshard.kernels.dma.gather import dma_attention_gather
from longshard.kernels.dma.naive import dma_attention_naive
from longshard.kernels.dma.select import dma_kept_fraction, dma_key_bias, select_key_blocks
from longshard.kernels.dma.triton import dma_attention_triton

__all__ = ["dma_attention_gather", "dma_attention_naive", "dma_attention_triton", "dma_key_bias", "dma_kept_fraction",
           "select_key_blocks"]
