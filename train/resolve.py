"""What a run checks and resolves before any work, in one module the planner, the CLI and the trainer
share: the model config (a recipe's, or an HF checkpoint's with the recipe's attention and RoPE
extension), the layout of a world size, and the evaluation lengths. Nothing here starts a process
group or builds a model."""

from __future__ import annotations

from dataclasses import replace

import torch
from longshard.errors import ConfigError, require
from longshard.models import hf_causal
from longshard.models.config import ModelConfig, RopeConfig
from longshard.models.hf import check_hf_checkpoint, config_from_hf, read_hf_config
from longshard.parallel.env import check_tp_heads, mesh_shape
from longshard.parallel.ulysses import kv_replication
from longshard.train.config import Config
from longshard.train.data.synthetic import passkey_sample


def resolve_model_config(cfg: Config) -> ModelConfig:
    """The model config: the recipe's, or the HF checkpoint's with the recipe's attention and RoPE extension."""
    if cfg.init.hf_path is None:
        return cfg.model
    hf = read_hf_config(cfg.init.hf_path)
    if cfg.init.hf_model == "transformers":  # transformers' config decides the forward; these are its shapes
        mcfg = hf_causal.model_config(hf, cfg.model.attention, cfg.init.rope_scaling, cfg.init.rope_factor)
        hf_causal.check_files(cfg.init.hf_path)
        require(cfg.train.seq_len <= mcfg.max_seq_len, "train.seq_len",
                f"{cfg.train.seq_len} exceeds the checkpoint's context {mcfg.max_seq_len}.",
                "extend RoPE with init.rope_scaling=yarn and init.rope_factor, or train shorter.")
        return mcfg
    mcfg = config_from_hf(hf, cfg.model.attention)
    check_hf_checkpoint(cfg.init.hf_path)  # damaged or unsafe weight files named before any work
    if cfg.init.rope_scaling != "keep":
        if mcfg.rope.scaling != "none":
            raise ConfigError("init.rope_scaling", f"the checkpoint already uses {mcfg.rope.scaling} RoPE scaling.",
                              "use init.rope_scaling=keep, or start from an unscaled checkpoint.")
        rope = RopeConfig(theta=mcfg.rope.theta, scaling=cfg.init.rope_scaling, factor=cfg.init.rope_factor,
                          original_max_seq_len=mcfg.max_seq_len)
        mcfg = replace(mcfg, rope=rope, max_seq_len=int(mcfg.max_seq_len * cfg.init.rope_factor))
    require(cfg.train.seq_len <= mcfg.max_seq_len, "train.seq_len",
            f"{cfg.train.seq_len} exceeds the checkpoint's context {mcfg.max_seq_len}.",
            "extend RoPE with init.rope_scaling=yarn and init.rope_factor, or train shorter.")
    return mcfg


def check_layout(cfg: Config, mcfg: ModelConfig, world_size: int) -> tuple[int, int]:
    """Validate the whole layout for ``world_size`` processes before any process group exists (the CLI
    calls it before spawning workers); return (dp, grad accumulation).

    Checks that sp x tp divides the world, the global batch splits over micro-batches x dp, and the
    heads split over tensor-parallel and Ulysses ranks.
    """
    t, par = cfg.train, cfg.parallel
    dp, _ = mesh_shape(world_size, par.sp_degree, par.tp_degree)
    per_step = t.micro_batch_size * dp
    require(t.global_batch_size % per_step == 0, "train.global_batch_size",
            f"{t.global_batch_size} is not divisible by micro_batch_size x data-parallel size "
            f"= {t.micro_batch_size} x {dp}.",
            "choose global_batch_size as a multiple of micro_batch_size x (processes / (sp_degree x tp_degree)).")
    heads, kv, tp = mcfg.n_query_heads, mcfg.n_kv_heads, par.tp_degree
    check_tp_heads(heads, kv, tp)
    uly = {"ulysses": par.sp_degree, "hybrid": par.sp_ulysses_degree}.get(par.sp_mode, 1) if par.sp_degree > 1 else 1
    if uly > 1:
        try:
            kv_replication(heads // tp, kv // tp, uly)
        except ConfigError as e:
            per = f" per tensor-parallel rank (tp_degree={tp})" if tp > 1 else ""
            raise ConfigError(e.field, f"{e.problem[:-1]}{per}.",
                              "choose another sp_degree / sp_ulysses_degree, or parallel.sp_mode=ring (it does "
                              "not split heads).") from None
    return dp, t.global_batch_size // per_step


def check_passkey_lengths(tokenizer, lengths: list[int]) -> None:
    """Fail before training when a passkey evaluation length cannot hold the prompt."""
    for n in lengths:
        try:
            passkey_sample(tokenizer, n, 0.5, torch.Generator().manual_seed(0))
        except ValueError as e:
            raise ConfigError("eval.passkey_lengths", f"{e}.",
                              "set eval.passkey_lengths to longer lengths or eval.passkey_samples=0.") from None


def passkey_lengths(cfg: Config) -> list[int]:
    """The passkey lengths a run (and ``longshard eval``) evaluates: ``eval.passkey_lengths``, or the
    training length and twice it."""
    return list(cfg.eval.passkey_lengths) or [cfg.train.seq_len, 2 * cfg.train.seq_len]
