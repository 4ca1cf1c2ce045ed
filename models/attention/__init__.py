"""Attention variants, chosen by name through one typed registry.

To add a variant: write ``models/attention/<name>.py`` with an options dataclass (subclassing
``AttentionOptions``) and a ``CoreAttention`` subclass decorated by
``@register_attention("<name>", Options)``, then import it below. What it supports it declares on
those two classes (see ``registry.py``).

Shape suffixes (the one legend for the whole package: ``q_BHSD`` is (batch, query heads,
positions, head dim)); each letter means one thing:

====  ==========================================================================================
B     batch
S     sequence positions (all of them)
L     positions held here (a rank's shard, or a gathered key buffer)
T     flattened tokens, or token slots of a gathered buffer
H     query heads
K     key/value heads (GQA/MQA: H is a multiple of K)
G     query heads per key/value head
D     q/k head dim (and the value head dim, unless V is named)
V     value head dim where it differs from D (linear attention's state is D x V)
E     model width (the residual stream)
W     vocabulary
Q     query positions or query blocks
N     key positions or key blocks
C     compressed summaries, or chunks
F     far-block slots per head (block-sparse patterns)
M     kept-block slots per query block (block lists)
X     per-head feature width (gates: 1 or D; NSA gate logits: 3)
====  ==========================================================================================
"""

from longshard.models.attention import dense, dma, linear, mixed, moh, nosa, nsa, power, s2, streaming  # noqa: F401  (registrations)
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
