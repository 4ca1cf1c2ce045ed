"""Megatron-core plug-in: any longshard attention variant as the ``core_attention`` of a GPTModel.

    from longshard.parallel.megatron import longshard_layer_spec
    spec = longshard_layer_spec("s2", {"block": 64, "local_blocks": 16, "vert_stride": 8})
    model = GPTModel(config, transformer_layer_spec=spec, vocab_size=..., max_sequence_length=...)

Megatron keeps its own projections, RoPE, norms and MLP; only the core attention (softmax over
q, k, v after RoPE) is ours. Under Megatron tensor parallelism each rank holds a contiguous slice
of the query heads (and of the KV groups): the variant is built for all heads and then sliced with
``set_head_slice``, so per-head patterns (S2 phases, streaming heads, decays) keep their global
head index. Packed sequences in Megatron's THD format are not supported (bshd only).
"""

from __future__ import annotations

from typing import Any

import torch
from longshard.models.attention import AttentionBatch, AttentionContext, build_attention
from torch import nn


def _tp_size_rank(pg_collection: Any) -> tuple[int, int]:
    group = getattr(pg_collection, "tp", None) if pg_collection is not None else None
    if group is None:
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            return 1, 0
        return (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_tensor_model_parallel_rank())
    return group.size(), group.rank()


class MegatronCoreAttention(nn.Module):
    """Adapter with Megatron's core-attention interface around a longshard attention variant.

    Args (keyword, as Megatron's ``SelfAttention`` passes them, plus our two):
        config: Megatron ``TransformerConfig``.
        layer_number: 1-based layer number.
        attention: longshard registry name (``dense``, ``s2``, ``streaming``, ``sliding_window``,
            ``nsa``, ``linear``, ``mixed``, ...).
        options: that variant's options.
    """

    def __init__(self, *, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 cp_comm_type=None, softmax_scale=None, pg_collection=None, attention: str = "dense",
                 options: dict | None = None, **_: Any) -> None:
        super().__init__()
        self.config = config
        heads = config.num_attention_heads
        groups = config.num_query_groups or heads
        head_dim = config.kv_channels or config.hidden_size // heads
        tp, rank = _tp_size_rank(pg_collection)
        if heads % tp or groups % tp:
            raise ValueError(f"heads ({heads}) and query groups ({groups}) must divide by tensor parallel size {tp}")
        ctx = AttentionContext(layer_idx=layer_number - 1, n_layers=config.num_layers, n_heads=heads,
                               n_kv_heads=groups, head_dim=head_dim, model_dim=config.hidden_size)
        opts = dict(options or {})
        if softmax_scale is not None and attention == "dense":
            opts.setdefault("softmax_scale", float(softmax_scale))
        self.inner = build_attention(attention, opts, ctx)
        if tp > 1:
            per = heads // tp
            self.inner.set_head_slice(rank * per, (rank + 1) * per)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **_: Any) -> torch.Tensor:
        """query (sq, b, heads, d), key/value (sk, b, groups, d) -> (sq, b, heads * d); causal."""
        if packed_seq_params is not None:
            raise NotImplementedError("longshard core attention takes bshd inputs; THD packed sequences are not "
                                      "supported: pass document ids through longshard's own model instead")
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by longshard core attention")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # -> (b, heads, s, d)
        o = self.inner(q, k, v, AttentionBatch())
        sq, b = query.shape[0], query.shape[1]
        return o.permute(2, 0, 1, 3).reshape(sq, b, -1)


def longshard_layer_spec(attention: str = "dense", options: dict | None = None, normalization: str = "RMSNorm",
                         qk_layernorm: bool = False):
    """Megatron's local GPT layer spec with our attention variant as ``core_attention``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=MegatronCoreAttention, params={"attention": attention, "options": dict(options or {})})
    return spec
