"""Lightning (decayed causal linear) attention: naive reference, blocked (chunk), recurrent and Triton forms."""

from longshard.kernels.lightning.chunk import lightning_attention_chunk, lightning_attention_recurrent
from longshard.kernels.lightning.naive import lightning_attention_naive
from longshard.kernels.lightning.triton import lightning_attention_triton

__all__ = [
    "lightning_attention_chunk",
    "lightning_attention_naive",
    "lightning_attention_recurrent",
    "lightning_attention_triton",
]
