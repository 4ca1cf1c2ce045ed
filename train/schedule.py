"""Learning-rate schedules: linear warmup, then cosine, warmup-stable-decay (WSD) or constant."""

from __future__ import annotations

import math

import torch
from longshard.train.config import OptimConfig
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    warm = cfg.warmup_steps
    if warm and step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = min((step - warm) / max(total_steps - warm, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(int(round(cfg.decay_fraction * total_steps)), 1)  # wsd
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return floor + (1 - floor) * (1 - progress)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> LambdaLR:
    """A LambdaLR following :func:`lr_factor`."""
    return LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))
