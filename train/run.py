"""What :func:`longshard.train.trainer.build_training` assembles and :class:`longshard.train.loop.TrainLoop`
runs: its own module, so that the trainer imports the loop and the loop imports neither."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from longshard.models.hf_causal import HFCausalLM
from longshard.models.model import Transformer
from longshard.parallel.layout import CommCounter, SeqShard
from longshard.train.engine import TrainEngine


@dataclass
class TrainingRun:
    """What :func:`build_training` assembles: the model, its parallel form and the engine that trains it.

    Args:
        model: the single-device :class:`Transformer` or :class:`HFCausalLM` (parallel wrappers applied in
            place).
        dmodel: the module the loop runs (DDP / FSDP2 module / DeepSpeed engine).
        sp: this rank's sequence shard, or None.
        engine: backward / step / checkpoints (:mod:`longshard.train.engine`).
        mesh: the device mesh.
        comm: the sequence-parallel traffic counter.
        conversion: the HF conversion's measured loss gap, or None.
        kept_fraction: attention kept fraction at ``train.seq_len`` (metrics).
        flops_per_token: training FLOPs per token (metrics).
    """

    model: Transformer | HFCausalLM
    dmodel: torch.nn.Module
    sp: SeqShard | None
    engine: TrainEngine
    mesh: Any
    comm: CommCounter
    conversion: dict[str, float] | None
    kept_fraction: float
    flops_per_token: float
