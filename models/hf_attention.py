"""longshard's attention variants as a transformers attention backend: ``attn_implementation="longshard"``.

Importing this module registers the backend (``transformers.AttentionInterface``) and its mask
function (transformers' SDPA masks). Which variant each layer runs is read from the model config's
``longshard_attention`` field: one attention entry for every layer, or a list of one per layer, in
the schema of ``model.attention`` in recipes (``{name, options}``)::

    import longshard.models.hf_attention  # registers "longshard"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="longshard")

``longshard export-hf`` writes that field (and ``attn_implementation: longshard``) into the
``config.json`` of a sparse model, so it loads as trained. Each layer's core attention is built from
the registry (:func:`longshard.models.attention.build_attention`), the same module our own
``Transformer`` runs: nothing here is a second copy of a variant. Only variants without parameters of
their own run through the backend (dense, s2, streaming with fixed heads, sliding_window, power, ...);
one with parameters is refused by name (its weights are not in a transformers checkpoint).

Masks: transformers' causal mask (None when purely causal), packed documents (from ``position_ids``)
and padding (left or right) are read off the mask as document ids, the form our kernels take; a mask
of any other shape (a sliding window from the model config, a custom mask) is refused by name rather
than run as something else.
"""

from __future__ import annotations

import math
import weakref
from pathlib import Path
from typing import Any

import torch
from longshard.errors import ConfigError
from longshard.files import read_json
from longshard.models.attention import AttentionSpec, build_attention
from longshard.models.attention.registry import AttentionBatch, AttentionContext, CoreAttention, parse_options

ATTN_IMPLEMENTATION = "longshard"
# the same backend with documents given as ``longshard_doc_ids`` and no mask built: transformers skips mask
# creation for an implementation without a mask function (a packed 32K batch otherwise materialises S x S)
ATTN_IMPLEMENTATION_IDS = "longshard_ids"
CONFIG_FIELD = "longshard_attention"
_CORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transformers attention module -> our core
_PARALLEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> its sequence-parallel core


def attention_specs(config: Any, allow_gates: bool = False) -> list[AttentionSpec]:
    """One :class:`AttentionSpec` per layer from ``config.longshard_attention`` (a dict for every layer,
    or a list of one per layer); dense when the field is absent. Output gates only with ``allow_gates``
    (:mod:`longshard.models.hf_swap` adds them). Raises ConfigError naming the field."""
    n_layers = int(config.num_hidden_layers)
    raw = getattr(config, CONFIG_FIELD, None)
    if raw is None:
        raw = {"name": "dense"}
    entries = raw if isinstance(raw, list) else [raw]
    if len(entries) not in (1, n_layers):
        raise ConfigError(CONFIG_FIELD, f"has {len(entries)} entries for {n_layers} layers.",
                          "give one entry for every layer or one per layer.")
    specs = []
    for i, entry in enumerate(entries):
        where = f"{CONFIG_FIELD}[{i}]" if isinstance(raw, list) else CONFIG_FIELD
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or set(entry) - {"name", "options", "gate"}:
            raise ConfigError(where, f"is {entry!r}, not {{name, options}}.", "use the schema of model.attention.")
        spec = AttentionSpec(name=entry["name"], options=dict(entry.get("options") or {}),
                             gate=entry.get("gate", "none"))
        parse_options(spec.name, spec.options, where)  # unknown variants and options named now
        if spec.gate != "none" and not allow_gates:
            raise ConfigError(f"{where}.gate", f"output gates ({spec.gate}) add parameters a transformers attention "
                              "module does not have.", "add them with longshard.models.hf_swap.add_longshard_attention "
                              "(or load with hf_swap.from_pretrained), or drop the gate.")
        specs.append(spec)
    return specs * n_layers if len(specs) == 1 else specs


def layer_core(module: torch.nn.Module, n_heads: int, n_kv_heads: int,
               device: torch.device | None = None) -> CoreAttention:
    """The core attention of ``module``'s layer: the one :mod:`longshard.models.hf_swap` attached with its
    parameters, else one built once per module from its config (parameter-free variants only).

    Args:
        module: a transformers attention module (``config``, ``layer_idx``, ``head_dim``).
        n_heads, n_kv_heads: its query and key/value heads.
        device: where the core's buffers go (default: the module's weights').
    """
    parts = module._modules.get("longshard")
    if parts is not None:
        return parts.core
    core = _CORES.get(module)
    if core is not None:
        return core
    config, layer_idx = module.config, int(module.layer_idx)
    spec = attention_specs(config)[layer_idx]
    ctx = AttentionContext(layer_idx=layer_idx, n_layers=int(config.num_hidden_layers), n_heads=n_heads,
                           n_kv_heads=n_kv_heads, head_dim=int(module.head_dim), model_dim=int(config.hidden_size))
    core = build_attention(spec.name, spec.options, ctx)
    own = [n for n, _ in core.named_parameters()]
    if own:
        raise ConfigError(f"{CONFIG_FIELD}[{layer_idx}]", f"attention {spec.name!r} has parameters of its own "
                          f"({', '.join(own[:3])}), which a transformers attention module does not hold; it cannot run "
                          "as an attention backend by itself.", "add its parameters with "
                          "longshard.models.hf_swap.add_longshard_attention(model) (or load a folder saved that way "
                          "with hf_swap.from_pretrained), or choose a variant without parameters.")
    core.to(device if device is not None else next(module.parameters()).device)
    _CORES[module] = core
    return core


def running_core(module: torch.nn.Module, n_heads: int, n_kv_heads: int) -> CoreAttention:
    """The core ``module`` runs now: the one :func:`set_layer_core` gave it, else :func:`layer_core`'s."""
    core = _PARALLEL.get(module)
    return core if core is not None else layer_core(module, n_heads, n_kv_heads)


def set_layer_core(module: torch.nn.Module, core: CoreAttention) -> None:
    """Run ``core`` (a sequence-parallel wrapper of the layer's core) for ``module`` from now on; the
    inputs are then sequence shards and documents come from the ``longshard_doc_ids`` argument."""
    _PARALLEL[module] = core


def doc_ids_from_mask(mask: torch.Tensor | None, q_len: int, k_len: int) -> torch.Tensor | None:
    """Document ids (B, S) equivalent to a transformers mask (B, 1|H, Sq, Sk) (bool: True attends; float:
    0 attends), or None for a purely causal one.

    A token that cannot see its predecessor starts a document; a row that cannot see itself is padding
    (its output is not used). Every other row must be exactly "earlier or same token of the same
    document", else ValueError (a sliding window, a custom mask).
    """
    if mask is None:
        return None
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if allowed.shape[1] != 1 and not bool((allowed == allowed[:, :1]).all()):
        raise ValueError("the attention mask differs between heads")
    allowed = allowed[:, 0]
    B = allowed.shape[0]
    offset = k_len - q_len
    rows = torch.arange(q_len, device=allowed.device)[:, None] + offset
    causal = torch.arange(k_len, device=allowed.device)[None, :] <= rows
    if offset:  # decoding with a cache: one document, every cached key visible (padding is not supported)
        if not bool((allowed == causal).all()):
            raise ValueError("decoding with a mask that is not plain causal (packed or padded prompts)")
        return None
    real = allowed.diagonal(dim1=-2, dim2=-1)  # (B, S): a row that sees itself is a real token
    sees_prev = torch.zeros(B, q_len, dtype=torch.bool, device=allowed.device)
    if q_len > 1:
        sees_prev[:, 1:] = allowed[:, torch.arange(1, q_len), torch.arange(q_len - 1)]
    doc = torch.cumsum((~sees_prev).int(), dim=1) - 1
    expected = (doc[:, :, None] == doc[:, None, :]) & causal
    wrong = (allowed != expected) & real[:, :, None]
    if bool(wrong.any()):
        b, i, j = (int(x) for x in wrong.nonzero()[0])
        raise ValueError(f"the attention mask is not causal within documents (row {b}: query {i}, key {j} is "
                         f"{'allowed' if bool(allowed[b, i, j]) else 'masked'}); a sliding window or a custom mask")
    if bool((doc == 0).all()):
        return None
    return doc


def merge_position_starts(doc_ids: torch.Tensor | None, position_ids: torch.Tensor | None, batch: int,
                          seq: int) -> torch.Tensor | None:
    """Document ids with a document also starting wherever ``position_ids`` do not continue the previous
    token (packed sequences: positions restart at 0). transformers derives packing from
    ``position_ids`` only without a cache; this applies it always, as flash-attention's varlen path does."""
    if position_ids is None or position_ids.shape[-1] != seq:
        return doc_ids
    pos = position_ids.expand(batch, seq)
    starts = torch.zeros(batch, seq, dtype=torch.bool, device=pos.device)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    if doc_ids is not None:
        starts[:, 1:] |= doc_ids[:, 1:] != doc_ids[:, :-1]
    if not bool(starts.any()):
        return doc_ids
    return torch.cumsum(starts.int(), dim=1)


def _documents(mask: torch.Tensor | None, position_ids: torch.Tensor | None, query: torch.Tensor,
               key: torch.Tensor, where: str) -> torch.Tensor | None:
    """Document ids of one (unsharded) batch from transformers' mask and ``position_ids``."""
    try:
        doc_ids = doc_ids_from_mask(mask, query.shape[2], key.shape[2])
    except ValueError as e:
        raise ConfigError("attention_mask", f"{where}: {e}; longshard runs causal attention within documents "
                          "(packed sequences, padding).", "pass position_ids for packed documents, or "
                          "attention_mask for padding only.") from None
    if query.shape[2] == key.shape[2]:  # packed documents named by position_ids (as flash-attention reads them)
        doc_ids = merge_position_starts(doc_ids, position_ids, query.shape[0], query.shape[2])
    return doc_ids


def longshard_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query`` (B, H, S, D), ``key``/``value`` (B, Hkv, Sk, D) after
    RoPE -> ((B, S, H, D), None), computed by the layer's longshard core attention.

    Args:
        module: the transformers attention module (its ``config`` and ``layer_idx`` pick the variant).
        query, key, value: projected, rotated heads (GQA/MQA keys and values not repeated).
        attention_mask: transformers' mask (None when purely causal).
        dropout: attention dropout (must be 0: our kernels have none).
        scaling: the softmax scale (default 1/sqrt(D)).
        kwargs: other transformers arguments; ``sliding_window`` and ``softcap`` are refused.
    """
    where = f"{type(module).__name__} of layer {getattr(module, 'layer_idx', '?')}"
    if dropout:
        raise ConfigError("attention_dropout", f"{where} asks for attention dropout {dropout}; longshard's kernels "
                          "have none.", "set config.attention_dropout=0.")
    for unsupported in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ConfigError(unsupported, f"{where} passes {unsupported}={kwargs[unsupported]!r}, which "
                              f"attn_implementation={ATTN_IMPLEMENTATION!r} would not apply.",
                              "express it as a longshard variant (e.g. {name: sliding_window}) or unset it in the "
                              "model config.")
    core = _PARALLEL.get(module)
    if core is not None:  # sequence shards: transformers' mask is the shard's, meaningless; docs come as ids
        doc_ids = kwargs.get("longshard_doc_ids")
    else:
        core = layer_core(module, query.shape[1], key.shape[1], query.device)
        doc_ids = kwargs["longshard_doc_ids"] if "longshard_doc_ids" in kwargs else \
            _documents(attention_mask, kwargs.get("position_ids"), query, key, where)
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)  # RoPE in fp32 under autocast: one dtype
    if scaling is not None and not math.isclose(scaling, core.softmax_scale, rel_tol=1e-6):
        query = query * (scaling / core.softmax_scale)  # logits = scaling x q.k, as transformers asks
    parts = module._modules.get("longshard")  # a swapped-in variant's parameters, gate and layer input
    x_BSE = parts.x_BSE if parts is not None else None
    out_BHSD = core(query, key, value, AttentionBatch(doc_ids_BS=doc_ids, x_BSE=x_BSE))
    if parts is not None:
        out_BHSD = parts.gate(out_BHSD)
    return out_BHSD.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``attn_implementation="longshard"`` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, longshard_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    AttentionInterface.register(ATTN_IMPLEMENTATION_IDS, longshard_attention_forward)  # no mask function: none built


register()


def verify_export(model: torch.nn.Module, path: str, seq_len: int = 64, tol: float | None = None) -> tuple[str, float]:
    """Load the exported folder ``path`` with transformers and compare its logits with ``model``'s (our
    ``Transformer``) on one random sequence. Returns (the attention implementation transformers chose,
    the max relative error); raises ConfigError above ``tol`` (default: 1e-4 for fp32 weights, 3e-2 for
    16-bit ones)."""
    from longshard.models import hf_swap
    from transformers import AutoModelForCausalLM

    weight = next(model.parameters())
    tol = tol if tol is not None else (1e-4 if weight.dtype == torch.float32 else 3e-2)
    if (Path(path) / "config.json").is_file() and CONFIG_FIELD in read_json(Path(path) / "config.json"):
        hf = hf_swap.from_pretrained(path, dtype=weight.dtype).eval()  # gates and variant parameters included
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=weight.dtype).eval()
    n = min(seq_len, model.cfg.max_seq_len)
    tokens = torch.randint(0, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(tokens).float()
        theirs = hf(tokens, use_cache=False).logits.float()
    err = float((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-30))
    impl = str(hf.config._attn_implementation)
    if not err <= tol:
        raise ConfigError("--verify", f"transformers (attn_implementation={impl}) gives logits {err:.1e} away from the "
                          f"checkpoint's (relative; tolerance {tol:.0e}).", "report it: the export does not run as "
                          "trained.")
    return impl, err
