"""What the training loop asks of the thing that owns gradients and the optimizer: one interface
(the :class:`TrainEngine` protocol), two engines implementing it, so neither the loop nor the
checkpointer has engine branches.
Each engine hands the checkpointer its state writer/reader (``engine.states``).

* :class:`NativeEngine`: our DDP/FSDP2 module, AdamW and schedule; global-norm clipping; fp16 runs
  scale the loss dynamically (``torch.amp.GradScaler``; ``ShardedGradScaler`` under FSDP2, which
  agrees on overflow across ranks) and skip the update of a step whose gradients overflowed.
* :class:`DeepSpeedTrainEngine`: a DeepSpeed engine (ZeRO over every rank) with our schedule; it
  clips and steps itself.

The loop: for each micro-batch ``with engine.accumulating(last): engine.backward(objective, last)``,
then ``engine.step()`` -> :class:`StepOutcome`, or ``engine.skip()`` to drop a step's gradients.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from longshard.parallel.data_parallel import clip_grad_norm, gradient_sync
from longshard.train.checkpoint import DCPStates, DeepSpeedStates
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class StepOutcome:
    """What an optimizer step did.

    Args:
        grad_norm: global gradient norm before clipping (unscaled; NaN when the engine does not report one).
        applied: whether the parameters were updated.
        overflow: fp16 only: the scaled gradients overflowed, the update was skipped and the loss scale
            lowered (a normal event of dynamic loss scaling, not a divergence).
    """

    grad_norm: float
    applied: bool
    overflow: bool = False


@runtime_checkable
class TrainEngine(Protocol):
    """What the loop drives: gradient accumulation, backward, the optimizer step, and the engine's
    persistence (``states``: how the checkpointer writes and reads its model and optimizer). Implemented,
    not inherited, by :class:`NativeEngine` (DDP/FSDP2, fp16 loss scaling) and
    :class:`DeepSpeedTrainEngine`; checkpoints go through :func:`save_checkpoint` / :func:`load_checkpoint`.

    Attributes:
        model: the module the loop runs.
        optimizer, scheduler: the torch optimizer and our LR schedule.
        states: the engine's state writer/reader (:class:`~longshard.train.checkpoint.DCPStates` or
            :class:`~longshard.train.checkpoint.DeepSpeedStates`).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    states: DCPStates | DeepSpeedStates

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager:
        """Context of one micro-batch's forward and backward (``last``: the step's last one)."""

    def backward(self, objective: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch's objective."""

    def step(self) -> StepOutcome:
        """The optimizer step at the end of a step's micro-batches."""

    abandons_steps: bool
    """Whether a step may be abandoned between micro-batches (its gradients dropped by :meth:`skip`)."""

    def skip(self) -> None:
        """Drop this step's gradients (the schedule advances in the loop)."""

    def state(self) -> dict[str, Any]:
        """Engine state that goes into the checkpoint's trainer state (JSON)."""

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state`."""

    def loss_scale(self) -> float | None:
        """The dynamic loss scale, for engines that scale (None otherwise)."""


def save_checkpoint(engine: TrainEngine, ckpt, step: int, trainer_state: dict) -> Path:
    """Write a checkpoint of ``engine`` at ``step`` through its own state writer; returns its folder."""
    return ckpt.save(step, engine.states, engine.scheduler, {**trainer_state, **engine.state()})


def load_checkpoint(engine: TrainEngine, ckpt, path: Path | None) -> tuple[Path | None, dict | None]:
    """Load ``path`` (None: the newest checkpoint that loads) into ``engine``; returns (path, trainer state)."""
    if path is None:
        path, state = ckpt.load_latest(engine.states, engine.scheduler)
    else:
        state = ckpt.load(path, engine.states, engine.scheduler)
    if state is not None:
        engine.load_state(state)
    return path, state


class NativeEngine:
    """DDP/FSDP2 (or a single device) with a torch optimizer.

    Args:
        model: the (data-parallel wrapped) module the loop runs.
        optimizer, scheduler: AdamW and its LR schedule.
        grad_clip: max global gradient norm (<= 0: no clipping, the norm is still measured).
        loss_scaling: dynamic loss scaling for fp16 compute.
        sharded: the module is FSDP2-sharded (overflow checks agree across ranks).
    """

    abandons_steps = True  # gradients are plain tensors: dropping them mid-accumulation undoes the step

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, grad_clip: float,
                 loss_scaling: bool = False, sharded: bool = False) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.states = DCPStates(model, optimizer)
        self.grad_clip = grad_clip
        self.scaler = None
        if loss_scaling:
            device = next(model.parameters()).device.type
            if sharded:
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler(device)
            else:
                self.scaler = torch.amp.GradScaler(device)

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """Gradient reduction only on the last micro-batch of a step."""
        with gradient_sync(self.model, enabled=last):
            yield

    def backward(self, objective: torch.Tensor, last: bool) -> None:
        (self.scaler.scale(objective) if self.scaler is not None else objective).backward()

    def step(self) -> StepOutcome:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = clip_grad_norm(self.model, self.grad_clip)  # global: the same on every rank
        if not math.isfinite(norm):
            if self.scaler is None:
                return StepOutcome(norm, False)
            scale = self.scaler.get_scale()
            self.scaler.update()  # records the overflow: the scale backs off
            self.optimizer.zero_grad(set_to_none=True)
            log.info("fp16 gradients overflowed at loss scale %g: update skipped, scale now %g", scale,
                     self.scaler.get_scale())
            return StepOutcome(norm, False, overflow=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(norm, True)

    def state(self) -> dict[str, Any]:
        """Engine state that goes into the checkpoint's trainer state (JSON): the loss scale."""
        if self.scaler is None:
            return {}
        sd = self.scaler.state_dict()
        return {"grad_scaler": {"scale": float(sd["scale"]), "growth_tracker": int(sd["_growth_tracker"])}}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` (a checkpoint without a loss scale keeps the initial one)."""
        if self.scaler is not None and "grad_scaler" in state:
            sd = self.scaler.state_dict()
            sd.update(scale=state["grad_scaler"]["scale"], _growth_tracker=state["grad_scaler"]["growth_tracker"])
            self.scaler.load_state_dict(sd)

    def loss_scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler is not None else None

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedTrainEngine:
    """A DeepSpeed engine: its ``backward``/``step`` own accumulation, clipping and ZeRO reductions.

    Args:
        engine: the engine of :func:`longshard.parallel.deepspeed_engine.initialize`.
        optimizer, scheduler: the torch optimizer it wraps and our schedule.
    """

    abandons_steps = False  # DeepSpeed counts micro-steps itself: a step it began is finished

    def __init__(self, engine: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        self.model, self.optimizer, self.scheduler = engine, optimizer, scheduler
        self.states = DeepSpeedStates(engine)  # ZeRO: DeepSpeed's own format

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        yield  # DeepSpeed reduces at its accumulation boundary

    def backward(self, objective: torch.Tensor, last: bool) -> None:
        self.model.backward(objective, scale_wrt_gas=False)  # our objective carries the accumulation scaling
        if not last:
            self.model.step()  # a non-boundary micro step: DeepSpeed only counts it

    def step(self) -> StepOutcome:
        self.model.step()  # the boundary: clip, optimizer step, zero grads
        norm = self.model.get_global_grad_norm()
        return StepOutcome(float(norm) if norm is not None else float("nan"), True)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state(self) -> dict[str, Any]:
        return {}  # DeepSpeed keeps its own state in its checkpoint

    def load_state(self, state: dict[str, Any]) -> None:
        """Nothing beyond DeepSpeed's own checkpoint."""

    def loss_scale(self) -> float | None:
        return None  # bf16/fp32 only (fp16 runs the native engine)
