"""Variants with parameters of their own inside a transformers model: one call adds them, one loads them.

:func:`add_longshard_attention` gives each attention module of a transformers causal LM what its
layer's ``longshard_attention`` entry adds beyond q/k/v/o (the core attention with its parameters,
e.g. DMA's A and Delta or NSA's compression and gates, and a Gated Attention output gate) as a
submodule ``longshard``, initialised so the model starts where it was (gates: weights 0, so
sigmoid = 1/2, and ``o_proj`` doubled, exactly as longshard's own conversions do; the variants'
own conversion-friendly initialisation). Those weights are ordinary parameters: they train, and
``save_pretrained`` writes them. :func:`from_pretrained` loads such a folder (transformers builds
the plain model, the parts are added and their saved weights read back, every one required).

The layer input a gate or router needs is taken by a forward pre-hook on the attention module;
auxiliary losses (MoH's load balance) are returned by :func:`aux_loss` for the training loop to add.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from longshard.errors import ConfigError
from longshard.models import hf_attention
from longshard.models.attention import build_attention
from longshard.models.attention.registry import AttentionContext, CoreAttention
from longshard.models.model import apply_output_gate, gate_width
from torch import nn

PARTS = "longshard"  # the submodule name on each transformers attention module


class LongshardParts(nn.Module):
    """What one layer's longshard attention adds to a transformers attention module.

    Args:
        core: the layer's core attention (with its own parameters).
        gate: ``none``, ``headwise`` or ``elementwise`` output gate.
        n_heads, head_dim, model_dim: the layer's shape.
    """

    def __init__(self, core: CoreAttention, gate: str, n_heads: int, head_dim: int, model_dim: int) -> None:
        super().__init__()
        self.core = core
        width = gate_width(gate, n_heads, head_dim)
        self.wg = nn.Linear(model_dim, width, bias=False) if width else None
        self.x_BSE: torch.Tensor | None = None  # the layer input of the current forward (set by the pre-hook)

    def gate(self, o_BHSD: torch.Tensor) -> torch.Tensor:
        """The output gate applied to ``o_BHSD`` (unchanged without one)."""
        if self.wg is None:
            return o_BHSD
        return apply_output_gate(o_BHSD, self.x_BSE.to(o_BHSD.dtype), self.wg)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a transformers decoder, in layer order (those with ``layer_idx``
    and q/k/v/o projections)."""
    found = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
             and all(isinstance(getattr(m, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))]
    return sorted(found, key=lambda m: m.layer_idx)


def _stash_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
    x = args[0] if args else kwargs.get("hidden_states")
    getattr(module, PARTS).x_BSE = x


def _attach(model: nn.Module) -> list[nn.Module]:
    """Build and attach the parts each layer's spec needs; returns the modules that got parts."""
    config = model.config
    specs = hf_attention.attention_specs(config, allow_gates=True)
    mods = attention_modules(model)
    if len(mods) != int(config.num_hidden_layers):
        raise ConfigError(hf_attention.CONFIG_FIELD, f"found {len(mods)} attention modules with q/k/v/o projections "
                          f"for {config.num_hidden_layers} layers in {type(model).__name__}.",
                          "use a decoder whose attention modules have q_proj, k_proj, v_proj and o_proj.")
    attached = []
    for module, spec in zip(mods, specs):
        H, D = int(config.num_attention_heads), int(module.head_dim)
        Hkv = int(getattr(config, "num_key_value_heads", None) or H)
        ctx = AttentionContext(layer_idx=module.layer_idx, n_layers=len(mods), n_heads=H, n_kv_heads=Hkv,
                               head_dim=D, model_dim=int(config.hidden_size))
        core = build_attention(spec.name, spec.options, ctx)
        if not list(core.parameters()) and spec.gate == "none":
            continue  # runs through the backend as it is
        weight = module.q_proj.weight
        parts = LongshardParts(core, spec.gate, H, D, ctx.model_dim).to(weight.device, weight.dtype)
        module.add_module(PARTS, parts)
        module.register_forward_pre_hook(_stash_input, with_kwargs=True)
        attached.append(module)
    return attached


def add_longshard_attention(model: nn.Module, attention: dict | list | None = None,
                            implementation: str = hf_attention.ATTN_IMPLEMENTATION) -> nn.Module:
    """Make ``model`` (a transformers causal LM) run longshard attention ``attention`` (the schema of
    ``model.attention`` in recipes; default: its config's ``longshard_attention``), with what the variants
    add initialised so the model starts at its current logits where the variant can (gates exactly; a
    sparse pattern or a selection only at lengths it keeps whole). Sets ``attn_implementation`` to
    ``implementation`` (``longshard``; ``longshard_ids`` when documents come as ids, as in longshard's
    trainer). Returns ``model``.
    """
    if attention is not None:
        setattr(model.config, hf_attention.CONFIG_FIELD, attention)
    with torch.no_grad():
        for module in _attach(model):
            parts = getattr(module, PARTS)
            parts.core.reset_variant_parameters()
            if parts.wg is not None:  # sigmoid(0) = 1/2 on every channel, o_proj doubled: the same output
                parts.wg.weight.zero_()
                module.o_proj.weight.mul_(2.0)
    model.set_attn_implementation(implementation)
    return model


def from_pretrained(path: str | Path, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, attn_implementation="longshard", **kwargs)`` with the
    parts :func:`add_longshard_attention` added and their saved weights read back from ``path`` (a
    missing or misshapen one is a ConfigError naming it)."""
    from longshard.models.hf import safetensors_header, weight_files
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the parts' weights as unexpected: read below
    try:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=hf_attention.ATTN_IMPLEMENTATION,
                                                     **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    _attach(model)
    wanted = {n: p for n, p in model.state_dict().items() if f".{PARTS}." in n}
    found: set[str] = set()
    for file in weight_files(Path(path)):
        if file.suffix != ".safetensors":
            raise ConfigError("path", f"{file} is not a safetensors file.", "save with safe_serialization.")
        header, _ = safetensors_header(file)
        names = [n for n in header if n in wanted]
        if not names:
            continue
        with safe_open(str(file), framework="pt") as f, torch.no_grad():
            for name in names:
                t = f.get_tensor(name)
                if t.shape != wanted[name].shape:
                    raise ConfigError("path", f"{file}: {name} has shape {tuple(t.shape)}, the model "
                                      f"{tuple(wanted[name].shape)}.", "load it with the config it was saved with.")
                wanted[name].copy_(t)
                found.add(name)
    missing = sorted(set(wanted) - found)
    if missing:
        raise ConfigError("path", f"{path} lacks the weights of the longshard attention parts: {', '.join(missing[:4])}"
                          f"{' ...' if len(missing) > 4 else ''}.", "save the model after add_longshard_attention.")
    return model


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The sum of the auxiliary losses (e.g. MoH's load balance) the last forward recorded, or None."""
    losses = [loss for m in attention_modules(model) if isinstance(getattr(m, PARTS, None), LongshardParts)
              for loss in [getattr(m, PARTS).core.pop_aux_loss()] if loss is not None]
    return torch.stack(losses).sum() if losses else None
