"""One typed registry for attention variants, chosen by name.

Adding a variant is one new module that defines a keyword-only options dataclass and a
:class:`CoreAttention` subclass, decorated with :func:`register_attention`, plus one import line
in ``longshard/models/attention/__init__.py``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from longshard.errors import ConfigError
from torch import nn


@dataclass(kw_only=True, frozen=True)
class AttentionContext:
    """What a layer tells its core attention about itself.

    Args:
        layer_idx: index of the layer in the model (0-based).
        n_layers: number of layers in the model.
        n_heads: query heads of this layer.
        n_kv_heads: key/value heads (GQA/MQA when < n_heads).
        head_dim: per-head dimension.
        context_covered_elsewhere: other heads of the same layer attend to the whole context
            (a sparse head group then need not cover it on its own).
        model_dim: width of the layer input (for variants with input-dependent gates).
    """

    layer_idx: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    context_covered_elsewhere: bool = False
    model_dim: int = 0


@dataclass(kw_only=True)
class AttentionBatch:
    """Per-batch information every core attention receives.

    Args:
        doc_ids_BS: (B, S) document index of each token for packed sequences; None = one document.
        cache_slot: per-layer decoding state (dict) for variants that keep their own state
            instead of past keys/values (``uses_kv_cache = False``); None when not decoding.
        x_BSE: the (normed) layer input of the current query positions, for input-dependent gates.
        head_feats_BHSX: per-head input features (:meth:`CoreAttention.head_features`) already
            computed for these heads and positions; set by head-parallel wrappers (Ulysses), which
            see only a sequence shard of ``x_BSE``. None = compute them from ``x_BSE``.
    """

    doc_ids_BS: torch.Tensor | None = None
    cache_slot: dict[str, Any] | None = None
    x_BSE: torch.Tensor | None = None
    head_feats_BHSX: torch.Tensor | None = None


CP_FORMS = ("ring", "sparse_exchange", "state")  # context-parallel forms a variant may declare


@dataclass(kw_only=True)
class AttentionOptions:
    """Base of every variant's options and the one place a variant declares what its layers support,
    answerable from the config alone (before any model or process group exists); the module built
    from these options reads them (:attr:`CoreAttention.cp_form`, :meth:`CoreAttention.tensor_parallel_problem`).
    Defaults: no ring form (Ulysses only), heads splittable by tensor parallelism.
    """

    # options a variant no longer takes -> the fix (named in the unknown-option error)
    moved_options: typing.ClassVar[dict[str, str]] = {}

    def context_parallel(self) -> str | None:
        """How these layers run over a ring of ranks (one of :data:`CP_FORMS`): ``ring`` (K/V rotate),
        ``sparse_exchange`` (only the K/V blocks the pattern reads move), ``state`` (recurrent states
        pass along the zigzag order), or None: Ulysses only (selection or gates need all keys)."""
        return None

    def ring_seq_multiple(self, ring_degree: int) -> int:
        """Sequence-length multiple these layers need on a ring of ``ring_degree`` ranks (each rank
        holds two zigzag chunks; block-sparse layers need whole blocks in each chunk)."""
        return 2 * ring_degree

    def tensor_parallel_problem(self) -> str | None:
        """Why tensor parallelism cannot split these layers' heads, or None when it can."""
        return None

    def head_parallel_problem(self) -> str | None:
        """Why these layers cannot run on a slice of their heads (Ulysses, hybrid), or None when they can."""
        return None

    def layer_spec(self, layer_idx: int) -> tuple[str, dict[str, Any]] | None:
        """Another registered variant (name, options) layer ``layer_idx`` is built as, or None for this
        one: a per-layer schedule inside the options (S2's ``dense_every_n_layers``) resolved where a
        layer's attention is read (:meth:`ModelConfig.layer_attention`, :func:`build_attention`), so the
        layer's module, options and capabilities are that variant's own."""
        return None


class CoreAttention(nn.Module):
    """Base class: attention on projected, rotated heads (Megatron's ``core_attention``).

    ``forward(q_BHSD, k_BHSD, v_BHSD, batch)`` takes queries (B, H, Sq, D) and keys/values
    (B, Hkv, Sk, D) with the queries being the last Sq of the Sk positions (Sq < Sk when decoding
    with a KV cache) and returns (B, H, Sq, D). Causal.

    Everything the rest of longshard asks a variant goes through this interface (its defaults suit
    dense-like variants; a variant overrides what differs):

    * ``covers_context``: the union over heads reaches every earlier token;
    * ``uses_kv_cache``: decoding appends keys/values to a cache and passes all of them (False for
      recurrent variants, which keep their own state in ``batch.cache_slot``);
    * :attr:`cp_form`, :meth:`tensor_parallel_problem`: the context-parallel form and why not under
      tensor parallelism, both read from the options (:class:`AttentionOptions`, declared there only);
    * :meth:`set_head_slice`: run a slice of the heads (Ulysses, tensor parallel);
    * :meth:`attention_flops_per_token`, :meth:`kept_fraction`: the work done (metrics, planner);
    * ``supports_offload``, :meth:`decode_block_budget` and ``block`` / ``decode_plan`` /
      ``attend_blocks``: decoding with the KV cache in host memory (:mod:`longshard.models.offload`);
    * :meth:`reset_variant_parameters`, :meth:`pop_aux_loss`: own parameters' initialisation and the
      auxiliary loss recorded by the last forward;
    * :attr:`softmax_scale`, :meth:`head_features`.
    """

    covers_context = True
    uses_kv_cache = True
    supports_offload = False  # implements decode_plan/attend_blocks (KV cache in host memory)

    def __init__(self, ctx: AttentionContext, opts: AttentionOptions) -> None:
        super().__init__()
        self.ctx, self.opts = ctx, opts
        self.last_aux_loss: torch.Tensor | None = None  # set by forwards with an auxiliary loss

    @property
    def cp_form(self) -> str | None:
        """How this layer runs over a ring (one of :data:`CP_FORMS`, or None: Ulysses only), as its
        options declare (:meth:`AttentionOptions.context_parallel`)."""
        return self.opts.context_parallel()

    @property
    def softmax_scale(self) -> float:
        """The scale applied to q.k (1/sqrt(head_dim) unless the variant sets its own)."""
        return 1.0 / math.sqrt(self.ctx.head_dim)

    def tensor_parallel_problem(self) -> str | None:
        """Why tensor parallelism cannot split this core's heads (None: it can), as its options declare
        (:meth:`AttentionOptions.tensor_parallel_problem`)."""
        return self.opts.tensor_parallel_problem()

    def kept_fraction(self, seq_len: int) -> float:
        """Share of the causal (query, key) pairs this core attends at ``seq_len`` (1.0: dense)."""
        return 1.0

    def decode_block_budget(self) -> int | None:
        """Most key blocks one decoding step reads per KV head (offloadable variants), or None."""
        return None

    def reset_variant_parameters(self) -> None:
        """Initialise parameters of the variant's own (the model's init covers the others)."""

    def pop_aux_loss(self) -> torch.Tensor | None:
        """The auxiliary loss of the last forward (e.g. a gate penalty), cleared on reading."""
        value, self.last_aux_loss = self.last_aux_loss, None
        return value

    def set_head_slice(self, start: int, stop: int) -> None:
        """Compute only query heads [start, stop) from now on (head-parallel execution, e.g. Ulysses).

        Variants whose heads differ (patterns, decays) restrict their per-head state; variants with
        per-head parameters cannot be split this way and raise.
        """
        raise NotImplementedError(f"attention {type(self).__name__} cannot run on a slice of its heads")

    def attention_flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs of this core per query token, averaged over a causal sequence of ``seq_len``
        tokens and summed over its heads (QK^T and PV, 2 FLOPs per multiply-add). Training costs 3x.

        The default is dense causal attention (a query reads (S + 1) / 2 keys on average); variants
        that read fewer keys, or none (linear), override it so throughput and MFU count the work done.
        """
        return dense_attention_flops(self.ctx.n_heads, self.ctx.head_dim, seq_len)

    def head_features(self, x_BSE: torch.Tensor) -> torch.Tensor | None:
        """Per-head features the variant computes from its layer input, (B, S, H, X) for all heads.

        Input-dependent gates (NSA) implement this so that a head-parallel wrapper can compute
        them on its sequence shard and exchange them like queries; None = the variant has none.
        """
        return None

    def head_features_for(self, batch: AttentionBatch, n_heads: int) -> torch.Tensor:
        """(B, n_heads, S, X): ``batch.head_feats_BHSX`` if given, else computed from ``batch.x_BSE``."""
        if batch.head_feats_BHSX is not None:
            return batch.head_feats_BHSX
        if batch.x_BSE is None:
            raise ValueError(f"{type(self).__name__} needs the layer input (AttentionBatch.x_BSE) for its gates")
        feats = self.head_features(batch.x_BSE).transpose(1, 2)
        if feats.shape[1] != n_heads:
            raise ValueError(f"{type(self).__name__} runs {n_heads} of its heads: pass head_feats_BHSX")
        return feats

    def forward(  # pragma: no cover - interface
        self, q_BHSD: torch.Tensor, k_BHSD: torch.Tensor, v_BHSD: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        raise NotImplementedError


def budget_kept_fraction(seq_len: int, budget: int) -> float:
    """Share of the causal (query, key) pairs kept when each query reads at most ``budget`` keys of its
    prefix: sum_t min(t + 1, budget) / sum_t (t + 1) over the ``seq_len`` queries."""
    if seq_len <= 0:
        return 1.0
    b = min(budget, seq_len)
    kept = b * (b + 1) / 2 + (seq_len - b) * b
    return kept / (seq_len * (seq_len + 1) / 2)


def dense_attention_flops(n_heads: int, head_dim: int, seq_len: int, keys_per_query: float | None = None) -> float:
    """Forward QK^T + PV FLOPs per query token: 4 x head_dim per key read, per head.

    Args:
        keys_per_query: mean keys a query reads; default (S + 1) / 2 (causal, dense).
    """
    keys = (seq_len + 1) / 2 if keys_per_query is None else min(keys_per_query, (seq_len + 1) / 2)
    return 4.0 * n_heads * head_dim * keys


def gqa_kv_slice(ctx: AttentionContext, start: int, stop: int, why: str) -> tuple[int, int]:
    """KV heads [kv0, kv1) of query heads [start, stop); raises if the slice splits a GQA group.

    Args:
        ctx: the layer's attention context.
        start, stop: the query-head slice.
        why: what the variant shares within a group (for the error).
    """
    G = ctx.n_heads // ctx.n_kv_heads
    if start % G or stop % G:
        raise NotImplementedError(
            f"{why} is shared by the {G} query heads of a GQA group and the slice [{start}, {stop}) splits a "
            f"group (a Ulysses degree above n_kv_heads={ctx.n_kv_heads})")
    return start // G, stop // G


@dataclass
class DecodePlan:
    """The complete key blocks one decoding step of an offloadable variant reads.

    Args:
        blocks_BKN: (B, Hkv, N) block indices per KV head, -1 = unused slot. The current,
            incomplete block is not listed: it is always on the device.
        bias_BKN: (B, Hkv, N) additive logit bias of each listed block's keys, or None.
    """

    blocks_BKN: torch.Tensor
    bias_BKN: torch.Tensor | None = None


def append_kv(
    slot: dict[str, Any], k_BHSD: torch.Tensor, v_BHSD: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append new keys/values to a decoding cache slot and return all of them."""
    if "k" in slot:
        k_BHSD = torch.cat([slot["k"], k_BHSD], dim=2)
        v_BHSD = torch.cat([slot["v"], v_BHSD], dim=2)
    slot["k"], slot["v"] = k_BHSD, v_BHSD
    return k_BHSD, v_BHSD


@dataclass(frozen=True)
class AttentionEntry:
    """A registered variant: its options dataclass and the module that implements it."""

    name: str
    options_cls: type
    module_cls: type[CoreAttention]
    doc: str = ""


_REGISTRY: dict[str, AttentionEntry] = {}


def register_attention(name: str, options_cls: type) -> Callable[[type[CoreAttention]], type[CoreAttention]]:
    """Class decorator registering a :class:`CoreAttention` subclass under ``name``.

    Args:
        name: registry name used in configs (``attention: [{name: ..., options: {...}}]``).
        options_cls: keyword-only dataclass of the variant's options (validated in ``__post_init__``).
    """
    if not (dataclasses.is_dataclass(options_cls) and issubclass(options_cls, AttentionOptions)):
        raise TypeError(f"options for attention {name!r} must be a dataclass subclassing AttentionOptions, "
                        f"got {options_cls}")

    def deco(cls: type[CoreAttention]) -> type[CoreAttention]:
        if name in _REGISTRY and _REGISTRY[name].module_cls is not cls:
            raise ValueError(f"attention {name!r} is already registered by {_REGISTRY[name].module_cls}")
        _REGISTRY[name] = AttentionEntry(name, options_cls, cls, (cls.__doc__ or "").strip().split("\n")[0])
        return cls

    return deco


def available_attention() -> list[str]:
    """Sorted names of the registered attention variants."""
    return sorted(_REGISTRY)


def get_entry(name: str, field_name: str = "attention.name") -> AttentionEntry:
    """Look up a variant, raising a :class:`ConfigError` that lists the valid names."""
    if name not in _REGISTRY:
        raise ConfigError(
            field_name,
            f"unknown attention variant {name!r}.",
            f"use one of: {', '.join(available_attention())}.",
        )
    return _REGISTRY[name]


def _check_type(value: Any, annotation: Any) -> bool:
    """Loose runtime type check for option values coming from YAML/CLI."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(
            _check_type(v, typing.get_args(annotation)[0]) for v in value
        ) if typing.get_args(annotation) else isinstance(value, (list, tuple))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def parse_options(name: str, options: Mapping[str, Any] | None, field_name: str = "attention") -> Any:
    """Build the typed options dataclass of variant ``name`` from a plain mapping.

    Unknown keys and wrongly typed values raise :class:`ConfigError` naming the option.
    """
    entry = get_entry(name, f"{field_name}.name")
    options = dict(options or {})
    hints = typing.get_type_hints(entry.options_cls)
    fields = {f.name for f in dataclasses.fields(entry.options_cls)}
    for key, value in options.items():
        if key not in fields:
            moved = entry.options_cls.moved_options.get(key)
            raise ConfigError(
                f"{field_name}.options.{key}",
                f"unknown option for attention {name!r}.",
                moved or f"valid options: {', '.join(sorted(fields)) or '(none)'}.",
            )
        if not _check_type(value, hints[key]):
            raise ConfigError(
                f"{field_name}.options.{key}",
                f"expected {hints[key]}, got {value!r} ({type(value).__name__}).",
            )
    try:
        return entry.options_cls(**options)
    except ConfigError as e:
        raise ConfigError(f"{field_name}.options.{e.field}", e.problem, e.fix) from None


def build_attention(name: str, options: Mapping[str, Any] | None, ctx: AttentionContext) -> CoreAttention:
    """Instantiate the core attention ``name`` with ``options`` for the layer described by ``ctx``."""
    entry = get_entry(name)
    opts = parse_options(name, options, f"model.attention[{ctx.layer_idx}]")
    other = opts.layer_spec(ctx.layer_idx)
    if other is not None:  # e.g. a dense layer of an S2 hybrid schedule
        return build_attention(*other, ctx)
    core = entry.module_cls(ctx, opts)
    own = [n for n, _ in core.named_parameters()]
    if own and opts.tensor_parallel_problem() is None:  # a variant author's mistake, not a user's
        raise TypeError(f"attention {name!r}: {type(core).__name__} has parameters of its own ({', '.join(own[:3])}) "
                        f"but {type(opts).__name__}.tensor_parallel_problem() returns None; declare why tensor "
                        "parallelism cannot split it (its per-head parameters would need their own reduction)")
    return core


@dataclass(kw_only=True)
class AttentionSpec:
    """Name and options of one layer's attention (a model config holds one or one per layer).

    Args:
        name: registered variant name, e.g. ``dense``.
        options: variant options; see that variant's options dataclass.
        gate: output gate applied before the output projection, computed from the layer input:
            ``none``, ``headwise`` (one sigmoid per head) or ``elementwise`` (one per channel).
    """

    name: str = "dense"
    options: dict[str, Any] = field(default_factory=dict)
    gate: str = "none"


GATES = ("none", "headwise", "elementwise")
