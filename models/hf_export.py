"""Writing a longshard model as a Hugging Face checkpoint folder (``longshard export-hf``).

``config.json`` for Llama, Qwen2 or Qwen3 (with ``longshard_attention`` and ``attn_implementation:
longshard`` for a model whose attention is not dense), safetensors shards and their index, written
through :mod:`longshard.files` (fresh random names renamed into place, never through a link).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import torch
from longshard.errors import ConfigError
from longshard.files import copy_file, create_exclusive, default_mode, probe_writable, set_mode, write_file
from longshard.models.config import ModelConfig
from longshard.models.hf import HF_CLASSES, SUPPORTED_ARCHS, to_hf_name
from longshard.models.model import Transformer
from safetensors.torch import save_file

log = logging.getLogger(__name__)


def hf_config_dict(
    cfg: ModelConfig, arch: str | None = None, dtype: torch.dtype = torch.float32, drop_gates: bool = False
) -> dict[str, Any]:
    """HF ``config.json`` content for ``cfg`` (``arch`` inferred: qk_norm→qwen3, q/k/v bias without an
    output bias→qwen2, else llama; Llama's and Qwen3's ``attention_bias`` puts a bias on q, k, v and o)."""
    if arch is None:
        arch = "qwen3" if cfg.qk_norm else ("qwen2" if cfg.qkv_bias and not cfg.o_bias else "llama")
    if arch not in SUPPORTED_ARCHS:
        raise ConfigError("arch", f"unsupported architecture {arch!r}.", f"use one of {SUPPORTED_ARCHS}.")
    if arch == "llama" and cfg.qk_norm:
        raise ConfigError("arch", "Llama has no QK-norm.", "export as qwen3.")
    if arch in ("llama", "qwen3") and cfg.qkv_bias != cfg.o_bias:
        raise ConfigError("arch", f"{arch}'s attention_bias puts a bias on q, k, v and o together; this model has "
                          f"qkv_bias={cfg.qkv_bias}, o_bias={cfg.o_bias}.",
                          "export as qwen2 (q/k/v bias only) or keep longshard checkpoints.")
    if arch == "qwen2" and (cfg.qk_norm or not cfg.qkv_bias or cfg.o_bias):
        raise ConfigError("arch", "Qwen2 needs q/k/v bias, no output bias and no QK-norm.",
                          "export as llama or qwen3.")
    if cfg.n_query_heads != cfg.n_heads:
        raise ConfigError("arch", "SQA query-head reduction has no HF Llama/Qwen equivalent.",
                          "export a model without it.")
    rope: dict[str, Any] = {"rope_theta": cfg.rope.theta, "rope_type": "default"}
    r = cfg.rope
    if r.scaling == "ntk":
        rope["rope_theta"] = r.theta * r.factor ** (cfg.head_dim / (cfg.head_dim - 2))  # static NTK = new base
    elif r.scaling == "linear":
        rope.update(rope_type="linear", factor=r.factor)
    elif r.scaling == "yarn":
        rope.update(rope_type="yarn", factor=r.factor, original_max_position_embeddings=r.original_max_seq_len,
                    beta_fast=r.beta_fast, beta_slow=r.beta_slow)
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(r, key) is not None:
                rope[key] = getattr(r, key)
        if not r.truncate:
            rope["truncate"] = False
    elif r.scaling == "llama3":
        rope.update(rope_type="llama3", factor=r.factor, original_max_position_embeddings=r.original_max_seq_len,
                    low_freq_factor=r.low_freq_factor, high_freq_factor=r.high_freq_factor)
    out = {
        "architectures": [HF_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.o_bias,
        "rope_theta": rope["rope_theta"],
        "rope_parameters": rope,
        "rope_scaling": None if r.scaling in ("none", "ntk") else {k: v for k, v in rope.items() if k != "rope_theta"},
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if arch == "qwen2":
        out["use_sliding_window"] = False
    if any(spec.name != "dense" or (spec.gate != "none" and not drop_gates) for spec in cfg.attention):
        # loads as trained with longshard's backend; without it transformers refuses the unknown
        # attn_implementation instead of running dense attention
        entries = [{"name": spec.name, "options": dict(spec.options),
                    **({"gate": spec.gate} if spec.gate != "none" and not drop_gates else {})}
                   for spec in cfg.attention]
        out["longshard_attention"] = entries[0] if len(entries) == 1 else entries
        out["attn_implementation"] = "longshard"
    return out


# What an earlier export (ours or transformers') leaves that a loader reads: removed by --overwrite
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
EXPORT_PATTERNS = ("model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")


def prepare_export_dir(path: str | Path, overwrite: bool = False, field: str = "--output",
                       check_only: bool = False) -> Path:
    """Check that an export can go to ``path`` before any work: a new or empty folder, or with
    ``overwrite`` a folder whose previous weight files, index and config are removed now (so no stale
    shard or index is left beside the new weights for a loader to pick). Creates the folder unless
    ``check_only`` (then nothing is changed: the checks run before a checkpoint is even read).

    Raises:
        ConfigError: naming ``field``: a file in the way, a non-empty folder without ``overwrite``, or a
            folder that cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(field, f"{path} is a file, not a folder.", "give a new or empty folder.")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            held = ", ".join(sorted(p.name for p in path.iterdir())[:6])
            raise ConfigError(field, f"{path} is not empty (it holds {held}); exporting there would mix the new "
                              "model with those files.", "give a new or empty folder, or pass --overwrite (removes "
                              "the folder's weight files, index and config.json first; other files stay).")
    if check_only:
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(field, f"cannot write to {existing}.", "give a writable folder.")
        return path
    if overwrite and path.is_dir():
        for f in [*(path / n for n in EXPORT_FILES), *(p for pat in EXPORT_PATTERNS for p in path.glob(pat))]:
            if f.is_symlink() or f.is_file():  # a link itself is removed, never what it points at
                f.unlink()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe_writable(path)
    except OSError as e:
        raise ConfigError(field, f"cannot write to {path}: {e.strerror or e}.", "give a writable folder.") from None
    return path


def _save_safetensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """``save_file`` into a fresh random name beside ``file`` (created exclusively here, so never a
    planted link), given the usual mode on our own descriptor (safetensors writes 0600), then renamed
    over ``file``."""
    tmp = file.with_name(f".{file.name}.{secrets.token_hex(8)}.tmp")
    os.close(create_exclusive(tmp))
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        set_mode(tmp, default_mode())
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_hf(
    model: Transformer,
    path: str | Path,
    arch: str | None = None,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    tokenizer_dir: str | Path | None = None,
    drop_gates: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as an HF checkpoint folder (config.json + safetensors, sharded when large).

    Args:
        model: the model to export (unsharded state).
        path: output folder (created).
        arch: ``llama``, ``qwen2`` or ``qwen3``; inferred from the config when None.
        dtype: dtype of the written tensors (default: the model's).
        max_shard_bytes: shard size above which an index file is written.
        tokenizer_dir: folder whose tokenizer files are copied beside the weights.
        drop_gates: leave out output gates (the exported model then computes something else: plain
            transformers runs it). Without it gates are exported with the variants' own parameters.
        overwrite: export into a non-empty folder, removing its previous weights first
            (:func:`prepare_export_dir`); without it only a new or empty folder is accepted.

    A model whose attention is not dense gets ``longshard_attention`` (its ``model.attention``) and
    ``attn_implementation: longshard`` in ``config.json``: with :mod:`longshard.models.hf_attention`
    imported, transformers runs each layer's variant as trained; without it, transformers refuses the
    unknown implementation rather than run dense attention. What a variant adds (its own parameters,
    e.g. NOSA's importance score, and output gates) is written under ``model.layers.N.self_attn.longshard``,
    where :func:`longshard.models.hf_swap.from_pretrained` reads it back; the backend alone refuses such
    layers by name.
    """
    path = prepare_export_dir(path, overwrite)
    state = {n: p.detach() for n, p in model.named_parameters() if not (drop_gates and ".attention.wg." in n)}
    dtype = dtype or next(iter(state.values())).dtype
    tensors = {to_hf_name(n): t.to(dtype).contiguous().cpu() for n, t in state.items()}
    if model.cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    write_file(path / "config.json", json.dumps(hf_config_dict(model.cfg, arch, dtype, drop_gates), indent=2))
    _write_weights(path, tensors, max_shard_bytes)
    _copy_tokenizer(tokenizer_dir, path)
    return path


def export_transformers_model(model: torch.nn.Module, path: str | Path, dtype: torch.dtype | None = None,
                              max_shard_bytes: int = 5 * 1024**3, tokenizer_dir: str | Path | None = None,
                              overwrite: bool = False) -> Path:
    """Write a model trained with ``init.hf_model=transformers`` (an
    :class:`~longshard.models.hf_causal.HFCausalLM`) as the transformers folder it came from: its own
    ``config.json`` (RoPE extension included) with ``longshard_attention`` and, when some layer is not
    dense, ``attn_implementation: longshard``; the weights under transformers' names, what a variant
    adds under ``self_attn.longshard`` (:func:`longshard.models.hf_swap.from_pretrained` reads it back).
    Arguments as :func:`export_hf`."""
    from longshard.models.hf_attention import CONFIG_FIELD

    path = prepare_export_dir(path, overwrite)
    hf = model.hf
    config = hf.config.to_dict()
    config.pop("_attn_implementation_autoset", None)
    specs = config.get(CONFIG_FIELD) or []
    config.pop("attn_implementation", None)
    if any(s.get("name") != "dense" or s.get("gate", "none") != "none" for s in specs):
        config["attn_implementation"] = "longshard"
    else:
        config.pop(CONFIG_FIELD, None)
    state = {n: p.detach() for n, p in hf.named_parameters()}  # a tied output matrix appears once
    dtype = dtype or next(iter(state.values())).dtype
    config["dtype"] = str(dtype).removeprefix("torch.")
    tensors = {n: t.to(dtype).contiguous().cpu() for n, t in state.items()}
    write_file(path / "config.json", json.dumps(config, indent=2))
    _write_weights(path, tensors, max_shard_bytes)
    _copy_tokenizer(tokenizer_dir, path)
    return path


def _copy_tokenizer(tokenizer_dir: str | Path | None, path: Path) -> None:
    """The tokenizer files of ``tokenizer_dir`` (if given) beside the exported weights."""
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).glob("tokenizer*"):
            copy_file(f, path / f.name)


def _write_weights(path: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """``tensors`` as model.safetensors, or as shards of at most ``max_shard_bytes`` with their index."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        _save_safetensors(shards[0], path / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _save_safetensors(shard, path / fname)
            weight_map.update({n: fname for n in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_file(path / "model.safetensors.index.json", json.dumps(index, indent=2))
