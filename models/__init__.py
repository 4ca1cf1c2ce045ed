"""Single-device model code: config, transformer, RoPE, attention registry, HF interop."""

from longshard.models.attention import AttentionSpec, available_attention, register_attention
from longshard.models.config import ModelConfig, RopeConfig
from longshard.models.model import (
    IGNORE_INDEX,
    InferenceCache,
    Transformer,
    cross_entropy_sum,
    positions_from_docs,
)

__all__ = [
    "IGNORE_INDEX",
    "InferenceCache",
    "AttentionSpec",
    "ModelConfig",
    "RopeConfig",
    "Transformer",
    "available_attention",
    "cross_entropy_sum",
    "positions_from_docs",
    "register_attention",
]
