"""Surviving faults: pre-emption signals, collective failures, and fault-injection drills.

* :class:`PreemptionWatch` turns SIGTERM (Slurm pre-emption / time limit, ``scancel``, torchrun
  shutting its workers down) and SIGINT (Ctrl-C) into a flag; every rank agrees on it once per step
  (one scalar all-reduce), so all ranks write the same checkpoint and leave the loop together. The
  same request delivered twice, or a repeat during the checkpoint, is tolerated; a later repeat
  terminates at once (the default action), for a process stuck where it cannot stop.
* :func:`collective_failure` rewrites a failed or timed-out collective into an error naming the
  rank, the step and the phase, instead of a bare backend message (or a hang: the process group
  is created with ``parallel.collective_timeout_s``).
* :func:`die_with_parent` asks Linux to send this process SIGTERM when its parent dies (torchrun
  killed, the ``longshard train`` wrapper killed), so no worker trains on unseen in the background.
* :func:`maybe_inject_fault` is a drill hook: ``LONGSHARD_INJECT_FAULT="kill:rank=1:step=4"`` makes
  rank 1 SIGKILL itself when step 4 starts (``hang:`` sleeps forever instead, ``term:`` sends itself
  SIGTERM; step 0 is start-up; ``:at=save`` fires as step 4's checkpoint save starts), on the first launch
  only (torchrun's ``TORCHELASTIC_RESTART_COUNT`` = 0), so restarts and resumption can be tested
  end to end. Unset in normal runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from longshard.train import early_signals

log = logging.getLogger(__name__)

FAULT_ENV = "LONGSHARD_INJECT_FAULT"


class CollectiveError(RuntimeError):
    """A collective failed or timed out (a peer died, hung or diverged)."""


class PreemptionWatch:
    """Record pre-emption signals; :meth:`agreed` tells every rank whether any rank got one.

    SIGTERM and SIGINT (Ctrl-C) both ask for a checkpoint and a clean stop. The same request often
    arrives twice (Slurm signals every process of a job step, and torchrun passes its own signal on to
    its workers): a repeat within ``repeat_window_s`` of the first is that same request, and no repeat
    interrupts a checkpoint being written (:meth:`saving`). A repeat after the window, outside a save,
    insists: the process terminates at once, as by default.

    Args:
        signals: signals to catch (default SIGTERM and SIGINT).
        repeat_window_s: seconds after the first signal during which repeats are the same request.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT),
                 repeat_window_s: float = 10.0) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self.repeat_window_s = repeat_window_s
        self._first_at = 0.0
        self._saving = 0
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. called from a notebook worker): cannot install
                log.warning("cannot install a %s handler outside the main thread", signal.Signals(sig).name)
        early = [(name, at) for name, at in early_signals.received() if signal.Signals[name] in signals]
        if early:  # caught by the worker's first handler, before this one existed: the same request
            self.requested, self.signal_name, self._first_at = True, early[0][0], early[0][1]
            log.warning("%s arrived during start-up: stopping before the first step", early[0][0])

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        name = signal.Signals(signum).name
        if not self.requested:
            self.requested, self.signal_name, self._first_at = True, name, time.monotonic()
            return
        if self._saving or time.monotonic() - self._first_at < self.repeat_window_s:
            log.warning("%s again: already stopping (%s)", name,
                        "writing the checkpoint" if self._saving else "the same request delivered twice")
            return
        self.restore()  # insisting: die as by default (SIGINT too, not a KeyboardInterrupt)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    @contextlib.contextmanager
    def saving(self):
        """A block (a checkpoint being written) that no repeated signal interrupts."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1

    def agreed(self, device: torch.device) -> bool:
        """All-reduce (max) of the flag: True on every rank when any rank was signalled."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag[0] > 0)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def collective_failure(error: Exception, rank: int, step: int, phase: str, timeout_s: float) -> CollectiveError:
    """A :class:`CollectiveError` naming where it happened, chained to the backend's error."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CollectiveError(
        f"rank {rank}: a collective failed during the {phase} of step {step} ({text}). "
        f"A peer rank probably died, hung or ran a different collective; the timeout is "
        f"parallel.collective_timeout_s={timeout_s:g}. Check the other ranks' logs; resume with "
        "checkpoint.resume=auto."
    )


def is_collective_error(error: BaseException) -> bool:
    """Whether ``error`` comes from the communication backend (gloo/NCCL) rather than from our code."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(error, dist_error):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and not is_out_of_memory(error) and any(
        key in text for key in ("gloo", "nccl", "timed out", "connection closed", "connection reset", "broken pipe",
                                "pair closure", "application timeout", "connection refused")
    )


_OOM_TEXT = ("can't allocate memory", "cuda out of memory", "out of memory", "not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the allocator refusing (torch's OutOfMemoryError, the CPU allocator's
    "can't allocate memory", a MemoryError), not a bug."""
    if isinstance(error, MemoryError) or isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(error, RuntimeError) and any(k in str(error).lower() for k in _OOM_TEXT)


def out_of_memory_message(error: BaseException, rank: int) -> str:
    """The one-line explanation of an allocator refusal, with the fixes."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return (f"rank {rank} ran out of memory ({first}). The model, sequence and batch of this layout do not fit "
            "here. Fix: `longshard plan RECIPE` lists layouts that fit; or lower train.micro_batch_size or "
            "train.seq_len, set train.activation_checkpointing=full, or spread the sequence over more processes "
            "(parallel.sp_degree); then resume with checkpoint.resume=auto.")


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Deliver ``sig`` to this process when its parent exits (Linux ``PR_SET_PDEATHSIG``).

    Returns False where unsupported. If the parent is already gone (re-parented to init), the
    signal is raised at once.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(sig), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)
    return True


FAULT_PHASES = ("step", "save")  # where a drill fires: when the step starts, or as its checkpoint save starts


def parse_fault(spec: str) -> tuple[str, int, int, str]:
    """``kind:rank=R:step=S[:at=PHASE]`` -> (kind, R, S, PHASE); kind is ``kill``, ``hang`` or ``term``
    (SIGTERM to itself); PHASE ``step`` (default: when step S starts; step 0 is start-up, after the model
    is built, before a checkpoint is loaded) or ``save`` (as the checkpoint of step S starts)."""
    parts = spec.split(":")
    fields = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    phase = fields.pop("at", "step")
    if parts[0] not in ("kill", "hang", "term") or set(fields) != {"rank", "step"} or phase not in FAULT_PHASES:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected 'kill:rank=R:step=S', 'hang:rank=R:step=S' or "
                         "'term:rank=R:step=S', optionally with ':at=save'")
    return parts[0], int(fields["rank"]), int(fields["step"]), phase


def maybe_inject_fault(step: int, rank: int, phase: str = "step") -> None:
    """Fire the drill fault configured in ``LONGSHARD_INJECT_FAULT`` when this rank reaches its step
    (``phase``: ``step`` as the step starts, ``save`` as its checkpoint save starts)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    kind, fault_rank, fault_step, fault_phase = parse_fault(spec)
    if rank != fault_rank or step != fault_step or phase != fault_phase:
        return
    log.warning("fault drill: %s on rank %d at step %d (%s)", kind, rank, step, phase)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "term":
        os.kill(os.getpid(), signal.SIGTERM)
        return
    while True:  # hang: peers must time out rather than wait forever
        time.sleep(3600)
