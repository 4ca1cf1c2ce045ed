"""Lightning (decayed causal linear) attention: naive reference, blocked (chunk) and recurrent forms."""

from longshard.kernels.lightning.chunk import lightning_attention_chunk, lightning_attention_recurrent
from longshard.kernels.lightning.naive import lightning_attention_naive

__all__ = ["lightning_attention_chunk", "lightning_attention_naive", "lightning_attention_recurrent"]
