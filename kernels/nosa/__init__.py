"""NOSA-style offloadable sparse attention: selection rules, naive reference and gather path."""

from longshard.kernels.nosa.gather import nosa_attention_gather
from longshard.kernels.nosa.naive import nosa_attention_naive
from longshard.kernels.nosa.select import (
    NOSAGeometry,
    block_summaries,
    importance_bias,
    select_far_blocks,
)

__all__ = [
    "NOSAGeometry",
    "block_summaries",
    "importance_bias",
    "nosa_attention_gather",
    "nosa_attention_naive",
    "select_far_blocks",
]
