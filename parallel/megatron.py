"""Megatron-core plug-in: any longshard attention variant as the ``core_attention`` of a GPTModel.

    from longshard.parallel.megatron import longshard_layer_spec
    spec = longshard_layer_spec("s2", {"block": 64, "local_blocks": 16, "vert_stride": 8})
    model = GPTModel(config, transformer_layer_spec=spec, vocab_size=..., max_sequence_length=...)

Megatron keeps its own projections, RoPE, norms and MLP; only the core attention (softmax over
q, k, v after RoPE) is ours. Under Megatron tensor parallelism each rank holds a contiguous slice
of the query heads (and of the KV groups): the variant is built for all heads and then sliced with
``set_head_slice``, so per-head patterns (S2 phases, streaming heads, decays) keep their global
head index. Packed sequences in Megatron's THD format are not supported (bshd only).

Megatron context parallelism (``context_parallel_size > 1``) shards the sequence zigzag (rank r
holds chunks r and 2*cp-1-r, its RoPE table sliced to match), which is longshard's ring layout;
the adapter then runs the variant sequence-parallel over Megatron's CP group with longshard's
own communication: ``sp_mode="ring"`` (ring / sparsity-aware exchange / linear state passing,
:func:`~longshard.parallel.ring.ring_form`) or ``"ulysses"`` (all-to-all over the CP group on
this tensor-parallel rank's heads). Tensor parallel x sequence parallel thus needs no
TransformerEngine.
"""

from __future__ import annotations

from typing import Any

import torch
from longshard.models.attention import AttentionBatch, AttentionContext, build_attention
from torch import nn


def _cp_group(pg_collection: Any):
    """Megatron's context-parallel group, or None without context parallelism."""
    group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
    if group is None:
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            return None
        group = parallel_state.get_context_parallel_group(check_initialized=False)
    return group if group is not None and group.size() > 1 else None


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
        sp_mode: under Megatron context parallelism, ``ring`` or ``ulysses`` (see the module doc).
    """

    def __init__(self, *, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 cp_comm_type=None, softmax_scale=None, pg_collection=None, attention: str = "dense",
                 options: dict | None = None, sp_mode: str = "ring", **_: Any) -> None:
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
        cp = _cp_group(pg_collection)
        if cp is not None:
            from longshard.errors import require
            from longshard.parallel.layout import CommCounter
            from longshard.parallel.ring import ring_form
            from longshard.parallel.ulysses import UlyssesAttention, kv_replication

            require(sp_mode in ("ring", "ulysses"), "sp_mode", f"unknown {sp_mode!r}.", "use ring or ulysses.")
            self.counter = CommCounter()
            if sp_mode == "ring":
                self.inner = ring_form(self.inner, cp, self.counter, f"Megatron layer {layer_number}")
            else:
                P, r = cp.size(), cp.rank()
                local, local_kv = heads // tp, groups // tp
                kv_repeat = kv_replication(local, local_kv, P)
                first = rank * local  # this tensor-parallel rank's first head (rank 0 without TP)
                self.inner.set_head_slice(first + r * local // P, first + (r + 1) * local // P)
                self.inner = UlyssesAttention(self.inner, cp, kv_repeat, self.counter, zigzag=True)

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
                         qk_layernorm: bool = False, sp_mode: str = "ring"):
    """Megatron's local GPT layer spec with our attention variant as ``core_attention``.

    Args:
        attention: longshard registry name.
        options: that variant's options.
        normalization: Megatron normalization (``RMSNorm`` or ``LayerNorm``).
        qk_layernorm: Megatron's QK layer norm.
        sp_mode: how the variant runs under Megatron context parallelism (``ring`` or ``ulysses``).
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    spec.submodules.self_attention.submodules.core_attention = ModuleSpec(
        module=MegatronCoreAttention,
        params={"attention": attention, "options": dict(options or {}), "sp_mode": sp_mode})
    return spec


def megatron_config(mcfg, **overrides: Any):
    """A megatron-core ``TransformerConfig`` for the same architecture as our ``ModelConfig``.

    RMSNorm, SwiGLU, no biases, no dropout, the unfused (portable) kernels and CPU initialisation;
    ``overrides`` (e.g. ``tensor_model_parallel_size``, ``context_parallel_size``) are passed on.
    With our weights copied in Megatron's layout, the GPTModel computes what our model computes.

    Args:
        mcfg: our :class:`~longshard.models.config.ModelConfig` (derived fields resolved).
        overrides: further ``TransformerConfig`` fields.
    """
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = dict(
        num_layers=mcfg.n_layers, hidden_size=mcfg.dim, num_attention_heads=mcfg.n_query_heads,
        num_query_groups=mcfg.n_kv_heads, kv_channels=mcfg.head_dim, ffn_hidden_size=mcfg.ffn_hidden_dim,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, layernorm_epsilon=mcfg.norm_eps,
        bias_activation_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        masked_softmax_fusion=False)
    return TransformerConfig(**{**fields, **overrides})


def cpu_compat() -> None:
    """Let megatron-core's model code run on CPU (gloo), for tests and demos without a GPU.

    megatron-core 0.16 moves its RoPE table to ``torch.cuda.current_device()`` and the context-
    parallel slicing index of that table to CUDA with pinned memory; both are pointed at the CPU.
    Does nothing when CUDA is available.
    """
    if torch.cuda.is_available():
        return
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    def pos_emb_on_this_cp_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group=None) -> torch.Tensor:
        if cp_group is None:  # megatron-core < 0.14 passes no group: its global context-parallel one
            from megatron.core import parallel_state

            cp_group = parallel_state.get_context_parallel_group()
        size, rank = cp_group.size(), cp_group.rank()
        idx = torch.tensor([rank, 2 * size - rank - 1])  # zigzag: chunks rank and 2*cp-1-rank
        pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * size, -1, *pos_emb.shape[seq_dim + 1 :])
        pos_emb = pos_emb.index_select(seq_dim, idx)
        return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2 :])

    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = pos_emb_on_this_cp_rank
    torch.cuda.current_device = lambda: "cpu"
