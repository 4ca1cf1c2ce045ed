"""Hugging Face interop: load Llama / Qwen2 / Qwen3 checkpoints from a local folder and export back.

Only local files are read (config.json + safetensors, sharded index included, or
``pytorch_model.bin`` loaded with ``weights_only=True``); nothing is downloaded and no code from a
checkpoint is executed.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from longshard.errors import ConfigError
from longshard.files import (
    read_json,
)
from longshard.models.attention import AttentionSpec
from longshard.models.config import ModelConfig, RopeConfig
from longshard.models.hf_files import (  # noqa: F401 - re-exported: the loaders' checks
    MAX_SAFETENSORS_HEADER,
    SAFETENSORS_DTYPES,
    _unsafe_pickle,
    check_weight_file,
    safetensors_header,
)
from longshard.models.model import Transformer
from safetensors.torch import load_file
from torch import nn

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# our parameter name (with {i} for the layer) -> HF name
_LAYER_MAP = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wo.bias": "self_attn.o_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_TO_OURS_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_HF_TO_OURS_TOP = {v: k for k, v in _TOP_MAP.items()}


# what a variant adds (its core's parameters, an output gate) -> where longshard.models.hf_swap keeps it
_PARTS_MAP = (("attention.core_attention.", "self_attn.longshard.core."), ("attention.wg.", "self_attn.longshard.wg."))


def is_variant_parameter(name: str) -> bool:
    """Whether our parameter ``name`` is one a variant or a gate adds (not in a plain HF checkpoint)."""
    m = _LAYER_RE.match(name)
    return m is not None and any(m.group(2).startswith(ours) for ours, _ in _PARTS_MAP)


def to_hf_name(name: str) -> str:
    """Our parameter name -> HF parameter name (a variant's own parameters and gates: under the
    ``self_attn.longshard`` submodule :mod:`longshard.models.hf_swap` adds)."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _LAYER_RE.match(name)
    part = next(((ours, theirs) for ours, theirs in _PARTS_MAP if m and m.group(2).startswith(ours)), None)
    if part is not None:
        return f"model.layers.{m.group(1)}.{part[1]}{m.group(2)[len(part[0]):]}"
    if m is None or m.group(2) not in _LAYER_MAP:
        raise KeyError(f"no Hugging Face name for parameter {name!r}")
    return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"


def from_hf_name(name: str) -> str | None:
    """HF parameter name -> ours (None for buffers we recompute, e.g. rotary inv_freq)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name in _HF_TO_OURS_TOP:
        return _HF_TO_OURS_TOP[name]
    m = _HF_LAYER_RE.match(name)
    part = next(((ours, theirs) for ours, theirs in _PARTS_MAP if m and m.group(2).startswith(theirs)), None)
    if part is not None:
        return f"layers.{m.group(1)}.{part[0]}{m.group(2)[len(part[1]):]}"
    if m is None or m.group(2) not in _HF_TO_OURS_LAYER:
        raise ConfigError("init.hf_path", f"checkpoint tensor {name!r} has no counterpart in longshard.")
    return f"layers.{m.group(1)}.{_HF_TO_OURS_LAYER[m.group(2)]}"


# rope_parameters / rope_scaling keys per rope_type that longshard maps (every other key is refused)
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "yarn": {"factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "mscale",
             "mscale_all_dim", "truncate"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}
_ROPE_REFUSED = {
    "dynamic": "dynamic NTK changes the frequencies with each batch's length at inference; longshard trains "
               "with fixed frequencies (identical to rope_type default up to max_position_embeddings)",
    "longrope": "LongRoPE's per-dimension short/long factor lists are not implemented",
}


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    """RoPE settings from an HF config, following transformers' ``ROPE_INIT_FUNCTIONS``; a type or key
    longshard does not implement is a ConfigError naming ``rope_scaling.<key>`` (never ignored)."""
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise ConfigError("init.hf_path", f"config.json: {key} is {json.dumps(hf[key])[:60]}, not an object.",
                              f"set {key} to an object such as {{\"rope_type\": \"yarn\", \"factor\": 4.0}} or "
                              "null.")
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = _hf_num({"rope_theta": params.get("rope_theta", hf.get("rope_theta", 10000.0))}, "rope_theta", float)
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if not isinstance(kind, str):
        raise ConfigError("init.hf_path", f"config.json: rope_type is {kind!r}, not a string.",
                          "set rope_type to default, linear, yarn or llama3.")
    if kind in _ROPE_REFUSED:
        raise ConfigError("init.hf_path", f"rope_scaling.rope_type={kind!r}: {_ROPE_REFUSED[kind]}.",
                          "use a checkpoint with rope_type default, linear, yarn or llama3, or extend the "
                          "context with init.rope_scaling=yarn.")
    if kind not in _ROPE_KEYS:
        raise ConfigError("init.hf_path", f"rope_scaling.rope_type={kind!r} in config.json is not supported.",
                          f"supported: {', '.join(_ROPE_KEYS)}.")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConfigError("init.hf_path", f"rope_scaling.partial_rotary_factor={partial}: rotating only part of "
                          "each head is not supported.", "use a checkpoint that rotates the whole head.")
    unknown = sorted(set(params) - _ROPE_KEYS[kind] - {"rope_type", "type", "rope_theta", "partial_rotary_factor"})
    if unknown:
        raise ConfigError("init.hf_path", f"rope_scaling.{unknown[0]} is not used by rope_type {kind!r} in "
                          f"longshard (keys it maps: {', '.join(sorted(_ROPE_KEYS[kind])) or 'none'}).",
                          "remove the key if transformers ignores it too, or use a supported rope_type.")
    kw: dict[str, Any] = {"theta": theta, "scaling": {"default": "none"}.get(kind, kind)}
    if kind == "default":
        return RopeConfig(**kw)
    orig = _hf_num(params, "original_max_position_embeddings", int,
                   _hf_num(hf, "max_position_embeddings", int, 0))
    factor = params.get("factor")
    if factor is None and kind == "yarn" and orig:  # transformers: max_position_embeddings / original
        factor = _hf_num(hf, "max_position_embeddings", int) / orig
    kw["factor"] = _hf_num({"factor": factor}, "factor", float)
    kw["original_max_seq_len"] = orig
    for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "low_freq_factor",
                "high_freq_factor"):
        if params.get(key) is not None and key in _ROPE_KEYS[kind]:
            kw[key] = _hf_num(params, key, float)
    if kind == "yarn":  # transformers: `beta_fast or 32`, `beta_slow or 1` (0 means the default)
        kw["beta_fast"] = kw.get("beta_fast") or 32.0
        kw["beta_slow"] = kw.get("beta_slow") or 1.0
        kw["truncate"] = bool(params.get("truncate", True))
    return RopeConfig(**kw)


# Every key of transformers' Llama / Qwen2 / Qwen3 configs, by what longshard does with it.
HF_MAPPED_KEYS = frozenset({
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings",
    "attention_bias", "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor",
})
# keys that change the forward only at a value longshard refuses: key -> (accepted values, why refused)
HF_REFUSED_UNLESS = {
    "hidden_act": (("silu",), "only SwiGLU with silu is implemented"),
    "mlp_bias": ((False, None), "MLP biases are not implemented"),
    "use_sliding_window": ((False, None), "Qwen sliding-window layers are not implemented"),
    "layer_types": (None, "only full-attention layers are implemented"),
    "attention_dropout": ((0, 0.0, None), "attention dropout is not implemented"),
    "is_encoder_decoder": ((False, None), "only decoder-only models load"),
}
# keys with no effect on the forward: generation, bookkeeping, initialisation, output flags, storage dtype,
# and sliding-window sizes used only with use_sliding_window (refused above)
HF_NO_EFFECT_KEYS = frozenset({
    "_name_or_path", "architectures", "bos_token_id", "eos_token_id", "pad_token_id", "id2label", "label2id",
    "transformers_version", "dtype", "torch_dtype", "use_cache", "output_attentions", "output_hidden_states",
    "return_dict", "problem_type", "initializer_range", "chunk_size_feed_forward", "sliding_window",
    "max_window_layers", "pretraining_tp",
    "longshard_attention", "attn_implementation",  # an exported sparse model's: the recipe's model.attention decides
})


def _check_hf_keys(hf: dict[str, Any]) -> None:
    """Refuse keys set to what longshard does not implement; warn once about keys it does not know."""
    for key, (accepted, why) in HF_REFUSED_UNLESS.items():
        if key not in hf:
            continue
        value = hf[key]
        if key == "layer_types":
            bad = sorted({t for t in (value or []) if t != "full_attention"})
            if bad:
                raise ConfigError("init.hf_path", f"config.json: layer_types has {', '.join(bad)}: {why}.")
        elif value not in accepted:
            raise ConfigError("init.hf_path", f"config.json: {key}={value!r}: {why}.",
                              f"longshard loads {key} in {[a for a in accepted if a is not None]}.")
    unknown = sorted(set(hf) - HF_MAPPED_KEYS - set(HF_REFUSED_UNLESS) - HF_NO_EFFECT_KEYS)
    if unknown:
        log.warning("config.json keys not known to longshard (ignored; check they do not change the model): %s",
                    ", ".join(unknown))


_REQUIRED = object()


def _hf_num(hf: dict[str, Any], key: str, kind: type, default: Any = _REQUIRED) -> Any:
    """``hf[key]`` as ``kind`` (int or float); a missing required key or a non-number is a ConfigError
    naming ``config.json: key``. ``None`` counts as missing (HF writes ``"head_dim": null``)."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError("init.hf_path", f"config.json has no {key!r}.",
                              "give the config.json the model was saved with (transformers writes every key).")
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        what = "an integer" if kind is int else "a number"
        raise ConfigError("init.hf_path", f"config.json: {key}={value!r} is not {what}.")
    return kind(value)


def config_from_hf(hf: dict[str, Any], attention: list[AttentionSpec] | None = None) -> ModelConfig:
    """Translate an HF ``config.json`` dict into a :class:`ModelConfig`.

    Args:
        hf: parsed config.json.
        attention: attention specs for the loaded model (default dense everywhere).
    """
    arch = hf.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError(
            "init.hf_path",
            f"unsupported architecture model_type={arch!r}.",
            f"longshard loads: {', '.join(SUPPORTED_ARCHS)}.",
        )
    _check_hf_keys(hf)
    bias = bool(hf.get("attention_bias", False))
    n_heads = _hf_num(hf, "num_attention_heads", int)
    dim = _hf_num(hf, "hidden_size", int)
    return ModelConfig(
        vocab_size=_hf_num(hf, "vocab_size", int),
        dim=dim,
        n_layers=_hf_num(hf, "num_hidden_layers", int),
        n_heads=n_heads,
        n_kv_heads=_hf_num(hf, "num_key_value_heads", int, n_heads),
        head_dim=_hf_num(hf, "head_dim", int, dim // max(n_heads, 1)),
        ffn_hidden_dim=_hf_num(hf, "intermediate_size", int),
        norm_eps=_hf_num(hf, "rms_norm_eps", float, 1e-6),
        qkv_bias=arch == "qwen2" or bias,  # Qwen2: q/k/v bias always; Llama/Qwen3 attention_bias: q/k/v and o
        o_bias=arch != "qwen2" and bias,
        qk_norm=arch == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=_hf_num(hf, "max_position_embeddings", int, 2048),
        rope=_rope_from_hf(hf),
        attention=list(attention) if attention else [AttentionSpec()],
    )


def weight_files(path: Path) -> list[Path]:
    """The weight files of a local HF checkpoint folder (safetensors shards, one safetensors file, or
    ``pytorch_model.bin``), each checked to exist."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise ConfigError("init.hf_path", f"{index} has no 'weight_map' object.", "re-copy the checkpoint folder.")
        bad = next(((k, f) for k, f in weight_map.items() if not isinstance(f, str) or not f
                    or Path(f).is_absolute() or ".." in Path(f).parts), None)
        if bad is not None:
            raise ConfigError("init.hf_path", f"{index} maps {bad[0]!r} to {bad[1]!r}, not a file name in {path}.",
                              "re-copy the checkpoint folder.")
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise ConfigError("init.hf_path", f"shard {f} listed in {index.name} is missing.")
        return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return [path / name]
    raise ConfigError(
        "init.hf_path",
        f"no weights in {path} (looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin).",
    )


def check_hf_checkpoint(path: str | Path) -> None:
    """Check a local HF checkpoint's config.json and weight files before any weight is read or any
    model is built: each file's header (or pickle opcodes), and the layer count and embedding shape
    config.json states against the tensors the safetensors headers describe."""
    hf = read_hf_config(path)
    tensors: dict[str, dict] = {}
    for f in weight_files(Path(path)):
        header = check_weight_file(f)  # read once: checked here, compared with config.json below
        tensors.update((k, v) for k, v in (header or {}).items() if k != "__metadata__")
    if tensors:
        _check_config_against_tensors(Path(path), hf, tensors)


def _check_config_against_tensors(path: Path, hf: dict[str, Any], tensors: dict[str, dict]) -> None:
    """config.json's num_hidden_layers and (vocab_size, hidden_size) match the weights' headers."""
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    n = _hf_num(hf, "num_hidden_layers", int)
    if layers != set(range(n)):
        held = f"layers 0-{max(layers)} ({len(layers)} in all)" if layers else "no layers"
        raise ConfigError("init.hf_path", f"{path}/config.json says num_hidden_layers={n}, but its weights hold "
                          f"{held}.", "use the config.json the weights were saved with.")
    embed = tensors.get("model.embed_tokens.weight")
    want = [_hf_num(hf, "vocab_size", int), _hf_num(hf, "hidden_size", int)]
    if embed is not None and list(embed["shape"]) != want:
        raise ConfigError("init.hf_path", f"{path}/config.json says vocab_size x hidden_size = {want[0]} x "
                          f"{want[1]}, but model.embed_tokens.weight is {embed['shape'][0]} x "
                          f"{embed['shape'][1] if len(embed['shape']) > 1 else '?'}.",
                          "use the config.json the weights were saved with.")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(path):
        check_weight_file(f)
        try:
            if f.suffix == ".safetensors":
                sd.update(load_file(str(f)))
            else:
                sd.update(torch.load(f, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError as e:  # weights_only refused a global (legacy-format pickle)
            found = re.search(r"GLOBAL (\S+)", str(e))
            raise _unsafe_pickle(f, found.group(1) if found else "a non-tensor object") from None
        except Exception as e:  # damaged after the header check (bit rot inside the data)
            raise ConfigError("init.hf_path", f"{f} could not be read: {str(e)[:300]}",
                              "re-copy or re-download that file.") from None
    return sd


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """Parsed ``config.json`` of a local HF checkpoint, with clear errors for missing files."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError("init.hf_path", f"{path} is not a directory.", "give a local HF checkpoint folder.")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ConfigError("init.hf_path", f"{cfg_file} does not exist.")
    hf = _read_json(cfg_file)
    if not isinstance(hf, dict):
        raise ConfigError("init.hf_path", f"{cfg_file} holds a {type(hf).__name__}, not a JSON object of settings.")
    return hf


def _read_json(file: Path) -> Any:
    try:
        return read_json(file)
    except (UnicodeDecodeError, ValueError, OSError) as e:
        where = (f" (line {e.lineno}, column {e.colno}: {e.msg})" if isinstance(e, json.JSONDecodeError)
                 else f" ({e})")
        raise ConfigError("init.hf_path", f"{file} is not valid JSON{where}.",
                          "re-copy the checkpoint folder; the file is damaged or truncated.") from None


def load_hf_state_dict(path: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Read HF weights and rename them to longshard names, checking every parameter is present."""
    sd = {}
    for name, t in _read_state_dict(Path(path)).items():
        ours = from_hf_name(name)
        if ours is not None:
            sd[ours] = t
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)
    return sd


def load_hf_model(
    path: str | Path, attention: list[AttentionSpec] | None = None, dtype: torch.dtype = torch.float32
) -> Transformer:
    """Build a :class:`Transformer` from a local HF checkpoint folder.

    Args:
        path: folder with config.json and weights.
        attention: attention specs to use instead of dense (new parameters keep their init).
        dtype: parameter dtype of the returned model.
    """
    cfg = config_from_hf(read_hf_config(path), attention)
    model = Transformer(cfg)
    sd = load_hf_state_dict(path, cfg)
    load_into(model, sd, str(path))
    return model.to(dtype)


def load_into(model: Transformer, sd: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``sd`` into ``model``; all projections/norms must be present, extra tensors are errors.

    Parameters that the checkpoint cannot have (attention-variant parameters and output gates
    added on conversion) keep their initialisation.
    """
    own = dict(model.named_parameters())
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        raise ConfigError("init.hf_path", f"{source}: tensors {unexpected[:5]} do not fit the model.")
    new_params = (".core_attention.", ".attention.wg.")  # added on conversion: keep their init
    missing = sorted(n for n in own if n not in sd and not any(p in n for p in new_params))
    if missing:
        raise ConfigError("init.hf_path", f"{source}: missing tensors {missing[:5]}.")
    with torch.no_grad():
        for name, t in sd.items():
            if own[name].shape != t.shape:
                raise ConfigError(
                    "init.hf_path",
                    f"{source}: {name} has shape {tuple(t.shape)}, model expects {tuple(own[name].shape)}.",
                )
            own[name].copy_(t.to(own[name].dtype))


def is_conversion(cfg: ModelConfig) -> bool:
    """True when some layer's attention is not what a Hugging Face checkpoint holds (plain dense, no gate)."""
    return any(cfg.layer_attention(i).name != "dense" or cfg.layer_attention(i).gate != "none"
               for i in range(cfg.n_layers))


class _HalfGate(nn.Module):
    """An output gate fixed at sigmoid(0) = 1/2 (what :func:`init_converted` starts a gate at)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def forward(self, x_BSE: torch.Tensor) -> torch.Tensor:
        return x_BSE.new_zeros(*x_BSE.shape[:-1], self.width)


@contextmanager
def dense_reference(model: Transformer) -> Iterator[Transformer]:
    """Temporarily run every layer of a converted model, after :func:`init_converted`, as the original
    checkpoint did: dense attention, and each output gate fixed at the 1/2 that, with ``wo`` doubled by
    the conversion, is exactly the original projection (x0.5, x2: bitwise in every float format).

    Used to measure the loss gap a conversion introduces, on the model as it is (whole, or sharded and
    sequence-parallel: wrap the dense cores the same way inside the block); restored on exit.
    """
    from longshard.models.attention.dense import DenseAttention, DenseOptions

    saved = []
    for layer in model.layers:
        attn = layer.attention
        saved.append((attn, attn.core_attention, attn.wg))
        attn.core_attention = DenseAttention(attn.ctx, DenseOptions())
        if attn.wg is not None:  # this rank's heads (tensor parallel splits them)
            attn.wg = _HalfGate(attn.n_heads * (1 if attn.gate_kind == "headwise" else attn.head_dim))
    try:
        yield model
    finally:
        for attn, core, wg in saved:
            attn.core_attention, attn.wg = core, wg


@torch.no_grad()
def init_converted(model: Transformer) -> None:
    """Initialise what a conversion added so the converted model starts as close to the original as it can.

    Output gates become exact: ``wg = 0`` gives sigmoid(0) = 1/2 on every channel and ``wo`` is
    doubled, so gate x output x wo equals the original output projection (training then moves
    the gates). Variant parameters keep their own conversion-friendly initialisation (NOSA's
    importance bias starts near 0; NSA's compression starts as mean pooling); what remains of the
    gap is the sparsity pattern itself.
    """
    for layer in model.layers:
        attn = layer.attention
        if attn.wg is not None:
            attn.wg.weight.zero_()
            attn.wo.weight.mul_(2.0)
