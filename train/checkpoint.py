"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is written into ``step_XXXXXXXX.tmp/`` and renamed to ``step_XXXXXXXX/`` by rank 0
only after every rank finished writing, so a half-written checkpoint is never picked up.
Contents: DCP shards of the model and optimizer (any DDP/FSDP2 layout, reshardable),
``trainer_state.json`` (step, data-loader position, metrics so far) and ``rank_<r>.pt`` with the
scheduler and per-rank RNG states (loaded with ``weights_only=True``).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt (the message names the file)."""


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (``*.tmp`` folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Save/load training state.

    Args:
        root: checkpoint folder.
        keep_last: complete checkpoints to keep.
        rank: this process's rank (rank 0 renames, prunes and writes the JSON state).
    """

    def __init__(self, root: str | Path, keep_last: int, rank: int, config_yaml: str = "") -> None:
        self.root, self.keep_last, self.rank = Path(root), keep_last, rank
        self.config_yaml = config_yaml

    def save(
        self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, trainer_state: dict
    ) -> Path:
        """Write checkpoint ``step`` (collective: every rank must call it)."""
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        extra = {"scheduler": scheduler.state_dict(), "rng": rng_state()}
        torch.save(extra, tmp / f"rank_{self.rank}.pt")
        dist.barrier()
        if self.rank == 0:
            (tmp / CONFIG_FILE).write_text(self.config_yaml)
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in complete_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        log.info("saved checkpoint %s", final)
        return final

    def latest(self) -> Path | None:
        """Newest complete checkpoint, or None."""
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def load(
        self, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> dict:
        """Restore model, optimizer, scheduler and RNG from ``path``; return the trainer state."""
        path = Path(path)
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise CheckpointError(f"{state_file} is missing: {path} is not a complete checkpoint.")
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"{path / '.metadata'} is missing: the DCP checkpoint is incomplete.")
        try:
            trainer_state = json.loads(state_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{state_file} is corrupt: {e}") from e
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        try:
            dcp.load(state, checkpoint_id=str(path))
        except Exception as e:  # DCP raises several types for bad files; name the folder
            raise CheckpointError(f"failed to read DCP checkpoint {path}: {e}") from e
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra_file = path / f"rank_{self.rank}.pt"
        if not extra_file.is_file():  # resumed with more ranks than saved: take rank 0's schedule
            extra_file = path / "rank_0.pt"
        try:
            extra = torch.load(extra_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{extra_file} is corrupt: {e}") from e
        scheduler.load_state_dict(extra["scheduler"])
        set_rng_state(extra["rng"])
        log.info("resumed from %s (step %d)", path, trainer_state["step"])
        return trainer_state


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Load only the model weights of checkpoint ``path`` into an unwrapped model (any process count)."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path / '.metadata'} is missing: {path} is not a complete DCP checkpoint.")
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:
        raise CheckpointError(f"failed to read DCP checkpoint {path}: {e}") from e
    model.load_state_dict(state["model"])
