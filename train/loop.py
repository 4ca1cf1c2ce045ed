"""The optimizer-step loop over a built run: :class:`TrainState` (what changes) and :class:`TrainLoop`.

:func:`longshard.train.trainer.train` builds the run (model, parallel form, engine, data, checkpoints,
metrics) and hands it here; the loop reads batches, accumulates gradients, steps the engine (which
hides DDP / FSDP2 / DeepSpeed), skips non-finite updates, logs, evaluates, checkpoints and stops on
pre-emption. Every rank runs the same loop and the same collectives in the same order.

A pre-emption does not wait for the optimizer step: the ranks agree on the flag after every
micro-batch, and a step interrupted between micro-batches is abandoned (gradients dropped, the data
loader and random state put back): the weights are still those of the previous step, which is
checkpointed, so the stop takes at most one micro-batch plus the save (DeepSpeed, which owns its
accumulation, finishes the step first).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from longshard.errors import ConfigError
from longshard.launch.stop_budget import slurm_budget_warnings
from longshard.parallel import unwrap
from longshard.parallel.env import all_agree
from longshard.train.checkpoint import Checkpointer, checkpoint_step, rng_state, set_rng_state
from longshard.train.config import Config
from longshard.train.data import DistributedLoader
from longshard.train.engine import save_checkpoint
from longshard.train.evaluate import forward_loss
from longshard.train.faults import (
    CollectiveError,
    PreemptionWatch,
    collective_failure,
    is_collective_error,
    maybe_inject_fault,
)
from longshard.train.metrics import MetricsLogger, peak_memory_bytes, window_memory
from longshard.train.run_lock import RunLocks

if TYPE_CHECKING:
    from longshard.parallel import DistEnv
    from longshard.train.run import TrainingRun  # what the trainer builds and the loop runs

log = logging.getLogger(__name__)


ABANDONED: Any = "abandoned"  # what step() returns for a step a pre-emption stopped between micro-batches


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf (with ``train.nan_policy=stop``, or too many skipped steps)."""


def parameters_finite(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether every parameter is finite on every rank (local shards checked, verdicts all-reduced)."""
    from torch.distributed.tensor import DTensor

    ok = all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all())
             for p in model.parameters())
    return all_agree(ok, device)


@dataclass
class TrainState:
    """What changes while the loop runs; the checkpoint's extra state and the report come from it.

    Args:
        start_step: the step the run resumed at (0 = a fresh run).
        history: the loss of every applied step so far (a resumed run's earlier ones first).
        last_ckpt: the newest checkpoint written or resumed from, or None.
        skipped_in_row: updates skipped in a row (non-finite loss or gradient, fp16 overflow).
        skipped: the steps of this launch whose update was skipped.
        preempted_at: the step a pre-emption stopped the run after, or None.
        last_comm: the sequence-parallel bytes and calls of this rank's last applied step.
    """

    start_step: int
    history: list[float]
    last_ckpt: Path | None
    skipped_in_row: int = 0
    skipped: list[int] = field(default_factory=list)
    preempted_at: int | None = None
    last_comm: dict[str, int] = field(default_factory=dict)


@dataclass
class StepInputs:
    """The constants a step's metrics are computed from.

    Args:
        autocast: the compute dtype (None = fp32).
        tokens_per_step: global batch x sequence length.
        flops_per_token: training FLOPs per token (the attention each variant performs: ``mfu``).
        peak_tflops: the device's peak (None = unknown: no MFU).
        kept_fraction: attention kept fraction at the training length.
        flops_per_token_torchtitan: torchtitan's count (full S x S attention: ``mfu_pct``).
    """

    autocast: torch.dtype | None
    tokens_per_step: int
    flops_per_token: float
    peak_tflops: float | None
    kept_fraction: float
    flops_per_token_torchtitan: float = 0.0


class TrainLoop:
    """Optimizer steps ``state.start_step + 1 .. train.steps`` of one rank.

    Args:
        cfg: the validated configuration.
        env: this rank's distributed environment.
        run: the built :class:`~longshard.train.run.TrainingRun` (model, module, shard, engine).
        loader: the training batches (its position is checkpointed).
        ckpt: the checkpointer.
        metrics: the metrics logger (rank 0 writes).
        state: the running state (fresh or resumed).
        inputs: constants of the step metrics.
        run_eval: evaluation of the current weights (held-out loss, passkey, ...), all ranks.
    """

    def __init__(self, cfg: Config, env: DistEnv, run: TrainingRun, loader: DistributedLoader, ckpt: Checkpointer,
                 metrics: MetricsLogger, state: TrainState, inputs: StepInputs,
                 run_eval: Callable[[], dict[str, Any]]) -> None:
        self.cfg, self.env, self.run = cfg, env, run
        self.engine = run.engine
        self.loader, self.ckpt, self.metrics = loader, ckpt, metrics
        self.state, self.inputs, self.run_eval = state, inputs, run_eval
        self.aux_by_layer: dict[int, float] = {}  # each layer's auxiliary loss in the last step (metrics)

    # --- the loop ------------------------------------------------------------------------------
    def fit(self, watch: PreemptionWatch, lock: RunLocks) -> None:
        """Run the steps, stop cleanly on an agreed pre-emption, then save the final checkpoint. (The
        caller holds ``metrics`` in a ``with`` block: any error closes the progress bar and wandb run.)"""
        cfg, state = self.cfg, self.state
        self.watch = watch
        first = state.start_step + 1
        if self.guarded(lambda: watch.agreed(self.env.device), first, "pre-emption check"):  # during start-up
            state.preempted_at, first = state.start_step, cfg.train.steps + 1
            log.warning("pre-empted (%s) during start-up, before step %d: stopped without training; nothing new "
                        "to save (resume with checkpoint.resume=auto)", watch.signal_name or "signal on another rank",
                        state.start_step + 1)
        self.run.dmodel.train()
        for step in range(first, cfg.train.steps + 1):
            maybe_inject_fault(step, self.env.rank)
            lock.heartbeat()
            rec, saved = self.guarded(lambda s=step: self.step(s), step, "training step")
            if rec is ABANDONED:
                self._stop_within(step)
                break
            state.last_ckpt = saved or state.last_ckpt
            if rec is not None and self.guarded(lambda: watch.agreed(self.env.device), step, "pre-emption check"):
                if saved is None:
                    state.last_ckpt = self.guarded(lambda s=step: self.save(s), step, "checkpoint save")
                state.preempted_at = step
                log.warning("pre-empted (%s): wrote the checkpoint of step %d and stopped; resume with "
                            "checkpoint.resume=auto", watch.signal_name or "signal on another rank", step)
                break
        watch.restore()
        if state.preempted_at is None and state.skipped_in_row:  # never a clean finish, never relabelled weights
            first_skip = cfg.train.steps - state.skipped_in_row + 1
            raise NonFiniteLossError(
                f"the run ended while skipping updates: steps {first_skip}-{cfg.train.steps} ({state.skipped_in_row} "
                f"in a row, {len(state.skipped)} in all) left the weights unchanged, so they are those of step "
                f"{first_skip - 1}; no final checkpoint was written (the last complete one, "
                f"{state.last_ckpt or 'none'}, is intact). Lower optim.lr, enable train.grad_clip, or use "
                "train.dtype=fp32 to investigate.")
        if state.preempted_at is None and cfg.checkpoint.save_final and (
                state.last_ckpt is None or checkpoint_step(state.last_ckpt) != cfg.train.steps):
            state.last_ckpt = self.guarded(lambda: self.save(cfg.train.steps), cfg.train.steps, "checkpoint save")

    def _stop_within(self, step: int) -> None:
        """Step ``step`` was abandoned on an agreed pre-emption: checkpoint step ``step - 1`` (the weights
        are its weights) unless that checkpoint exists, and record the stop."""
        state, done = self.state, step - 1
        if done > 0 and (state.last_ckpt is None or checkpoint_step(state.last_ckpt) != done):
            state.last_ckpt = self.guarded(lambda: self.save(done), done, "checkpoint save")
        state.preempted_at = done
        log.warning("pre-empted (%s) during step %d, after micro-batch %d of %d: its update was not applied; %s "
                    "stopped; resume with checkpoint.resume=auto", self.watch.signal_name or "signal on another rank",
                    step, self._micro_done, self._micro_total,
                    f"the checkpoint of step {done} ({state.last_ckpt}) holds the weights," if done > 0 else
                    "nothing was trained yet, nothing to save;")

    def step(self, step: int) -> tuple[dict[str, Any] | None, Path | None]:
        """One optimizer step; returns its metrics (None when the update was skipped, ABANDONED when a
        pre-emption stopped it between micro-batches) and its checkpoint."""
        step_t0 = time.time()
        before = (self.loader.state_dict(), rng_state())
        micro, n_global = self._batches(step)
        accumulated = self._accumulate(micro, n_global)
        if accumulated is None:  # put back what the step consumed: a resume replays it exactly
            self.loader.load_state_dict(before[0])
            set_rng_state(before[1])
            self.engine.skip()
            return ABANDONED, None
        loss, aux = accumulated
        if not math.isfinite(loss):
            return self._skip_update(step, f"loss is {loss}")
        lr = self.engine.scheduler.get_last_lr()[0]
        outcome = self.engine.step()
        if outcome.overflow:  # fp16 loss scaling: a skipped update and a lower scale, not a divergence
            return self._skip_update(
                step, f"fp16 gradients overflowed (loss scale now {self.engine.loss_scale():g})", overflow=True)
        if not outcome.applied:  # a finite loss can still give an inf/NaN gradient
            return self._skip_update(step, f"gradient norm is {outcome.grad_norm} (loss {loss:.4g})")
        self.state.skipped_in_row = 0
        self.engine.scheduler.step()
        self.state.history.append(loss)
        rec = self._record(step, loss, aux, lr, outcome.grad_norm, max(time.time() - step_t0, 1e-9))
        cfg = self.cfg
        if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.train.steps:
            rec.update(self.run_eval())
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            rec.update(window_memory(self.env.device))  # peaks of this logging window, then reset
            self.metrics.log(step, rec)
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            return rec, self.guarded(lambda: self.save(step), step, "checkpoint save")
        return rec, None

    # --- parts of a step -----------------------------------------------------------------------
    def _batches(self, step: int) -> tuple[list[dict[str, torch.Tensor]], float]:
        """This rank's micro-batches of the step (its sequence shard) and the global target-token count.

        A rank whose windows hold damaged tokens makes every rank stop with that error (none hangs).
        """
        cfg, env, sp = self.cfg, self.env, self.run.sp
        t0 = time.time()
        try:
            micro, bad_data = self.loader.next_step(), None
        except ConfigError as e:
            micro, bad_data = [], e
        if sp is not None:  # every rank of a sequence group got the same samples: keep its shard
            micro = [sp.shard(b["tokens"], b["labels"], b["doc_ids"] if cfg.data.doc_mask else None) for b in micro]
        self._data_s = time.time() - t0
        n_local = sum(int((b["labels"] != -100).sum()) for b in micro)
        counts = torch.tensor([float(n_local), float(bad_data is not None)], device=env.device)
        dist.all_reduce(counts)  # the token count, and whether any rank's batch could not be read
        if counts[1] > 0:
            raise bad_data or ConfigError("data.path", f"another rank could not read its batch of step {step} "
                                          "(damaged data; see that rank's log).",
                                          "re-run longshard data prepare for that corpus.")
        return micro, max(float(counts[0]), 1.0)

    def _accumulate(self, micro: list[dict[str, torch.Tensor]], n_global: float) -> tuple[float, float] | None:
        """Forward and backward of every micro-batch; returns the global token-mean loss and the aux loss
        (its per-layer parts are kept in ``self.aux_by_layer`` for the metrics), or None when the ranks
        agreed on a pre-emption between two micro-batches (the step is then abandoned)."""
        env, dmodel = self.env, self.run.dmodel
        loss_sum = torch.zeros((), device=env.device)
        aux_sum = 0.0
        self.aux_by_layer = {}
        watch = getattr(self, "watch", None)
        may_stop = watch is not None and self.engine.abandons_steps and len(micro) > 1
        self._micro_total = len(micro)
        for i, b in enumerate(micro):
            if i > 0 and may_stop and watch.agreed(env.device):
                self._micro_done = i
                return None
            last = i == len(micro) - 1
            with self.engine.accumulating(last):
                ce = forward_loss(dmodel, b, env.device, self.inputs.autocast, self.cfg.data.doc_mask).loss_sum
                # Gradient of the global token-mean loss: data parallel averages over ranks, so scale back up.
                objective = ce * (env.world_size / n_global)
                by_layer = unwrap(dmodel).aux_losses()
                if by_layer:  # parameter penalties, load balance: once per optimizer step
                    aux = torch.stack(list(by_layer.values())).sum()
                    objective = objective + aux / len(micro)
                    aux_sum += float(aux.detach()) / len(micro)
                    for i, v in by_layer.items():
                        self.aux_by_layer[i] = self.aux_by_layer.get(i, 0.0) + float(v.detach()) / len(micro)
                self.engine.backward(objective, last)
            loss_sum += ce.detach()
        dist.all_reduce(loss_sum)
        if self.aux_by_layer:  # log the ranks' mean: what the averaged gradients optimise (under Ulysses a
            # rank holds its heads' share of a load-balance loss, scaled so that the mean is the whole)
            layers = sorted(self.aux_by_layer)
            vals = torch.tensor([self.aux_by_layer[i] for i in layers], device=env.device)
            dist.all_reduce(vals)
            self.aux_by_layer = dict(zip(layers, (vals / env.world_size).tolist()))
            aux_sum = sum(self.aux_by_layer.values())
        return float(loss_sum) / n_global, aux_sum

    def _skip_update(self, step: int, what: str, overflow: bool = False) -> tuple[None, None]:
        """Leave the weights untouched for this step (``nan_policy=skip``) or stop (``stop``, or too many
        skips in a row): the update of a non-finite loss or gradient never reaches the parameters.
        An fp16 overflow (``overflow``) skips whatever the policy; only too many in a row stop."""
        cfg, state = self.cfg, self.state
        state.skipped_in_row += 1
        state.skipped.append(step)
        if (cfg.train.nan_policy == "stop" and not overflow) or state.skipped_in_row > cfg.train.max_skipped_steps:
            raise NonFiniteLossError(
                f"{what} at step {step} (rank {self.env.rank}); nan_policy={cfg.train.nan_policy}"
                + (f", {state.skipped_in_row} steps in a row" if cfg.train.nan_policy == "skip" else "")
                + ". The weights were not updated. Lower optim.lr, enable train.grad_clip, or use "
                "train.dtype=fp32 to investigate.")
        log.warning("%s at step %d: skipping the update (%d in a row)", what, step, state.skipped_in_row)
        self.engine.skip()
        self.engine.scheduler.step()
        return None, None

    def _record(self, step: int, loss: float, aux: float, lr: float, grad_norm: float, dt: float) -> dict[str, Any]:
        """The metrics of an applied step."""
        x, world = self.inputs, self.env.world_size
        tps = x.tokens_per_step / dt
        offload = self.run.model.activation_offload
        rec: dict[str, Any] = {
            "loss": loss, "aux_loss": aux, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
            "tflops_per_device": x.flops_per_token * tps / world / 1e12,
            "mfu": (x.flops_per_token * tps / world / 1e12 / x.peak_tflops) if x.peak_tflops else None,
            # torchtitan's names and units: per-device tokens/s, MFU in percent of its FLOPs count
            "tps": tps / world,
            "mfu_pct": (100 * x.flops_per_token_torchtitan * tps / world / 1e12 / x.peak_tflops)
            if x.peak_tflops else None,
            "data_loading_s": getattr(self, "_data_s", 0.0),
            "peak_mem_gb": peak_memory_bytes(self.env.device) / 1e9, "step_time_s": dt,
            "tokens_seen": step * x.tokens_per_step, "attn_kept_fraction": x.kept_fraction,
            "offloaded_act_gb": offload.offloaded_bytes / 1e9 if offload else 0.0,
        }
        self.state.last_comm = self.run.comm.reset()
        rec.update({f"comm/{k}": v for k, v in self.state.last_comm.items()})
        rec.update({f"aux/layer{i}": v for i, v in sorted(self.aux_by_layer.items())})
        if self.engine.loss_scale() is not None:  # fp16: the dynamic loss scale after this step
            rec["loss_scale"] = self.engine.loss_scale()
        return rec

    # --- checkpoints and failures --------------------------------------------------------------
    def save(self, step: int) -> Path:
        """Checkpoint the weights, optimizer, loader position and losses (never non-finite weights)."""
        maybe_inject_fault(step, self.env.rank, "save")
        if not parameters_finite(self.run.dmodel, self.env.device):
            raise NonFiniteLossError(
                f"parameters are not finite at step {step}: checkpoint not written (the last complete one, "
                f"{self.state.last_ckpt or 'none'}, is intact). Lower optim.lr or enable train.grad_clip.")
        extra = {"loader": self.loader.state_dict(), "losses": self.state.history, "world_size": self.env.world_size}
        watch = getattr(self, "watch", None)
        with watch.saving() if watch is not None else contextlib.nullcontext():  # no repeated signal cuts it
            path = save_checkpoint(self.engine, self.ckpt, step, extra)
        if not getattr(self, "_budget_checked", False) and self.env.is_main:  # the first measured save on Slurm
            self._budget_checked = True
            for warning in slurm_budget_warnings(self.ckpt.last_save_s):
                log.warning("%s", warning)
        return path

    def guarded(self, fn: Callable[[], Any], step: int, phase: str) -> Any:
        """Run ``fn``; a backend failure becomes a CollectiveError naming rank, step and phase."""
        try:
            return fn()
        except CollectiveError:  # already named by an inner phase
            raise
        except Exception as e:
            if is_collective_error(e):
                raise collective_failure(e, self.env.rank, step, phase, self.cfg.parallel.collective_timeout_s) from e
            raise
