"""Mixture-of-Heads attention (MoH): per-token head routing, naive reference and the routed path."""

from longshard.kernels.moh.gates import MoHGates, balance_loss, moh_gates
from longshard.kernels.moh.naive import moh_attention_naive
from longshard.kernels.moh.routed import moh_attention_all_heads, moh_attention_routed

__all__ = [
    "MoHGates", "balance_loss", "moh_attention_all_heads", "moh_attention_naive", "moh_attention_routed", "moh_gates",
]
