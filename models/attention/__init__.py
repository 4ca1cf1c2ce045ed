"""Attention variants, chosen by name through one typed registry.

To add a variant: write ``models/attention/<name>.py`` with an options dataclass and a
``CoreAttention`` subclass decorated by ``@register_attention("<name>", Options)``, then import it
below.
"""

from longshard.models.attention import dense, linear, mixed, nosa, nsa, s2, streaming  # noqa: F401  (registrations)
from longshard.models.attention.registry import (
    AttentionBatch,
    AttentionContext,
    AttentionSpec,
    CoreAttention,
    available_attention,
    build_attention,
    get_entry,
    parse_options,
    register_attention,
)

__all__ = [
    "AttentionBatch",
    "AttentionContext",
    "AttentionSpec",
    "CoreAttention",
    "available_attention",
    "build_attention",
    "get_entry",
    "parse_options",
    "register_attention",
]
