"""Typed model configuration (Llama/Qwen-style decoder)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from longshard.errors import ConfigError, require, require_positive
from longshard.models.attention.registry import GATES, AttentionSpec, parse_options

ROPE_SCALINGS = ("none", "linear", "ntk", "yarn", "llama3")


@dataclass(kw_only=True)
class RopeConfig:
    """Rotary position embedding and its context-extension scaling.

    Args:
        theta: RoPE base.
        scaling: ``none``, ``linear`` (position interpolation), ``ntk`` (static NTK-aware base
            change), ``yarn`` (YaRN, with attention temperature), ``llama3`` (Llama 3.1 band scaling).
        factor: context extension factor (new length / original length).
        original_max_seq_len: context length the model was trained at before scaling
            (needed by ``yarn`` and ``llama3``).
        beta_fast, beta_slow: YaRN ramp bounds (rotations).
        attention_factor: YaRN cos/sin scale; default 0.1 ln(factor) + 1, or with ``mscale`` and
            ``mscale_all_dim`` both set (DeepSeek style) (0.1 mscale ln f + 1) / (0.1 mscale_all_dim ln f + 1).
        mscale, mscale_all_dim: see ``attention_factor``.
        truncate: YaRN rounds the correction range to whole dimensions (transformers' default);
            ``False`` keeps the fractional bounds (gpt-oss style).
        low_freq_factor, high_freq_factor: Llama 3.1 band edges.
    """

    theta: float = 10000.0
    scaling: str = "none"
    factor: float = 1.0
    original_max_seq_len: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self) -> None:
        require_positive(self.theta, "model.rope.theta")
        require(
            self.scaling in ROPE_SCALINGS,
            "model.rope.scaling",
            f"unknown RoPE scaling {self.scaling!r}.",
            f"use one of: {', '.join(ROPE_SCALINGS)}.",
        )
        require_positive(self.factor, "model.rope.factor")
        if self.scaling in ("yarn", "llama3"):
            require(
                self.original_max_seq_len > 0,
                "model.rope.original_max_seq_len",
                f"RoPE scaling {self.scaling!r} needs the pre-extension context length.",
                "set it to the length the checkpoint was trained at (e.g. 8192).",
            )

    @property
    def max_seq_len_factor(self) -> float:
        """How far this scaling extends the usable context (1.0 without scaling)."""
        return 1.0 if self.scaling == "none" else self.factor


@dataclass(kw_only=True)
class ModelConfig:
    """Llama/Qwen-style decoder-only transformer.

    Args:
        vocab_size: embedding rows (>= tokenizer vocabulary).
        dim: model (hidden) width.
        n_layers: transformer blocks.
        n_heads: nominal attention heads (sets the default head_dim = dim // n_heads).
        n_query_heads: query heads actually computed (SQA: fewer than n_heads, projected back
            to ``dim`` by the output projection); default n_heads.
        n_kv_heads: key/value heads (GQA when < n_heads, MQA when 1); default n_heads.
        head_dim: per-head width; default dim // n_heads.
        ffn_hidden_dim: SwiGLU inner width; default 8/3·dim rounded up to ``ffn_multiple_of``.
        ffn_multiple_of: rounding for the default ffn width.
        norm_eps: RMSNorm epsilon.
        qkv_bias: bias on q/k/v projections (Qwen2).
        o_bias: bias on the attention output projection (Llama / Qwen3 ``attention_bias: true``).
        qk_norm: RMSNorm on each head of q and k before RoPE (Qwen3).
        tie_embeddings: share the input embedding with the output projection.
        max_seq_len: longest sequence the model is meant for (RoPE scaling included).
        rope: rotary embedding settings.
        attention: one spec for every layer, or one per layer (hybrid models).
        init_std: std of the normal initialisation of weights.
    """

    vocab_size: int = 320
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_query_heads: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None
    ffn_hidden_dim: int | None = None
    ffn_multiple_of: int = 64
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention: list[AttentionSpec] = field(default_factory=lambda: [AttentionSpec()])
    init_std: float = 0.02

    # Filled from other fields when left unset; a config schema must keep them unset (None).
    DERIVED: ClassVar[tuple[str, ...]] = ("n_query_heads", "n_kv_heads", "head_dim", "ffn_hidden_dim")

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "norm_eps", "init_std"):
            require_positive(getattr(self, name), f"model.{name}")
        if self.n_query_heads is None:
            self.n_query_heads = self.n_heads
        require_positive(self.n_query_heads, "model.n_query_heads")
        require(self.n_query_heads <= self.n_heads, "model.n_query_heads",
                f"{self.n_query_heads} exceeds n_heads={self.n_heads}.", "SQA uses fewer query heads, not more.")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_query_heads
        require_positive(self.n_kv_heads, "model.n_kv_heads")
        require(
            self.n_query_heads % self.n_kv_heads == 0,
            "model.n_kv_heads",
            f"query heads ({self.n_query_heads}) are not a multiple of n_kv_heads ({self.n_kv_heads}).",
            "choose n_kv_heads that divides the query heads (GQA groups must be equal).",
        )
        if self.head_dim is None:
            require(
                self.dim % self.n_heads == 0,
                "model.head_dim",
                f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads}).",
                "set model.head_dim explicitly or change dim/n_heads.",
            )
            self.head_dim = self.dim // self.n_heads
        require_positive(self.head_dim, "model.head_dim")
        require(self.head_dim % 2 == 0, "model.head_dim", f"RoPE needs an even head_dim, got {self.head_dim}.")
        if self.ffn_hidden_dim is None:
            hidden = int(8 * self.dim / 3)
            m = self.ffn_multiple_of
            self.ffn_hidden_dim = m * ((hidden + m - 1) // m)
        require_positive(self.ffn_hidden_dim, "model.ffn_hidden_dim")
        require(
            len(self.attention) in (1, self.n_layers),
            "model.attention",
            f"has {len(self.attention)} entries for {self.n_layers} layers.",
            "give one entry (used by every layer) or exactly one per layer.",
        )
        self.attention = list(self.attention)  # never rewrite the caller's list
        self._options = []  # parsed options of each entry (not a field: read by layer_attention)
        for i, spec in enumerate(self.attention):
            if isinstance(spec, dict):  # built from Python with plain dicts
                spec = AttentionSpec(**spec)
                self.attention[i] = spec
            self._options.append(parse_options(spec.name, spec.options, f"model.attention[{i}]"))
            require(spec.gate in GATES, f"model.attention[{i}].gate", f"unknown gate {spec.gate!r}.",
                    f"use one of: {', '.join(GATES)}.")

    def layer_attention(self, layer_idx: int) -> AttentionSpec:
        """The attention spec layer ``layer_idx`` is built with: its entry, or the variant its entry's
        options schedule for that layer (:meth:`AttentionOptions.layer_spec`, e.g. S2's dense layers)."""
        if not 0 <= layer_idx < self.n_layers:
            raise ConfigError("layer_idx", f"{layer_idx} outside 0..{self.n_layers - 1}.")
        k = 0 if len(self.attention) == 1 else layer_idx
        spec, other = self.attention[k], self._options[k].layer_spec(layer_idx)
        if other is None:
            return spec
        return AttentionSpec(name=other[0], options=dict(other[1]), gate=spec.gate)  # e.g. S2's dense layers

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count implied by the config (attention-variant parameters such as gates alpha or NSA
        compression are not included)."""
        hd, h, kv = self.head_dim, self.n_query_heads, self.n_kv_heads
        attn = self.dim * hd * (h + 2 * kv) + h * hd * self.dim
        if self.qkv_bias:
            attn += hd * (h + 2 * kv)
        if self.o_bias:
            attn += self.dim
        if self.qk_norm:
            attn += 2 * hd
        mlp = 3 * self.dim * self.ffn_hidden_dim
        per_layer = attn + mlp + 2 * self.dim
        gates = sum({"none": 0, "headwise": h, "elementwise": h * hd}[self.layer_attention(i).gate]
                    for i in range(self.n_layers)) * self.dim
        emb = self.vocab_size * self.dim
        total = self.n_layers * per_layer + gates + self.dim
        if include_embedding:
            total += emb if self.tie_embeddings else 2 * emb
        else:
            total += 0 if self.tie_embeddings else emb
        return total
