"""How long a clean stop takes on Slurm, against how long Slurm waits.

A stop is one micro-batch plus the checkpoint save (:mod:`longshard.train.loop`). Slurm gives it:

- at the time limit, the lead of ``#SBATCH --signal=B:USR1@<lead>`` (the generated script exports it
  as ``LONGSHARD_SIGNAL_LEAD_S``), after which the job is killed;
- at ``scancel`` or a pre-emption, ``KillWait`` seconds (``scontrol show config``; 30 by default)
  between SIGTERM and SIGKILL.

Every checkpoint records how long it took to write (``save_s`` in its state file): ``launch slurm``
sizes the lead from the newest one, and a run on Slurm says at start-up (and after its first save,
when it had nothing to go by) when a save cannot finish inside either window.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

DEFAULT_LEAD_S = 120  # what the template asked for before leads were sized from measurements
LEAD_ENV = "LONGSHARD_SIGNAL_LEAD_S"


def measured_save_s(ckpt_dir: str | Path) -> float | None:
    """The save time recorded by the newest complete checkpoint in ``ckpt_dir`` (None: none recorded)."""
    from longshard.train.checkpoint import CheckpointError, complete_checkpoints, read_trainer_state

    for path in reversed(complete_checkpoints(ckpt_dir)):
        try:
            value = read_trainer_state(path).get("save_s")
        except CheckpointError:
            continue
        if type(value) in (int, float) and 0 <= value < 1e6:
            return float(value)
    return None


def signal_lead_for(save_s: float | None) -> int:
    """Seconds of warning to ask Slurm for: twice the measured save plus a minute for the last
    micro-batch and the requeue (at least :data:`DEFAULT_LEAD_S`; that when nothing was measured)."""
    if save_s is None:
        return DEFAULT_LEAD_S
    return max(DEFAULT_LEAD_S, int(math.ceil(2 * save_s + 60)))


def slurm_kill_wait(timeout_s: float = 5.0) -> int | None:
    """The cluster's KillWait in seconds (``scontrol show config``), or None off Slurm / unreadable."""
    if shutil.which("scontrol") is None:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=timeout_s).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^KillWait\s*=\s*(\d+)", out, re.M)
    return int(found.group(1)) if found else None


def budget_warnings(save_s: float, lead_s: float | None, kill_wait_s: float | None) -> list[str]:
    """Sentences for each Slurm window a save of ``save_s`` seconds does not fit in (empty: both fit)."""
    out = []
    if lead_s is not None and save_s > lead_s:
        out.append(f"a checkpoint save takes about {save_s:.0f} s, more than the {lead_s:.0f} s of warning Slurm gives "
                   f"before the time limit (--signal lead): the job would be killed mid-save and lose the steps since "
                   f"the last periodic checkpoint. Regenerate the script with `longshard launch slurm` (it sizes the "
                   f"lead from this measurement: {signal_lead_for(save_s)} s) or pass --signal-lead.")
    if kill_wait_s is not None and save_s > kill_wait_s:
        out.append(f"a checkpoint save takes about {save_s:.0f} s, more than the cluster's KillWait of "
                   f"{kill_wait_s:.0f} s: a scancel or pre-emption (SIGTERM, then SIGKILL after KillWait) kills the "
                   "run before its stop checkpoint is written; it resumes from the last periodic checkpoint. "
                   "Checkpoint more often (checkpoint.every) or ask the administrators for a longer KillWait.")
    return out


def slurm_budget_warnings(save_s: float | None) -> list[str]:
    """:func:`budget_warnings` for this process's Slurm job (nothing off Slurm or without a measurement)."""
    if save_s is None or "SLURM_JOB_ID" not in os.environ:
        return []
    lead = os.environ.get(LEAD_ENV)
    return budget_warnings(save_s, float(lead) if lead and lead.isdigit() else None, slurm_kill_wait())
