"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is written into ``step_XXXXXXXX.tmp/`` and renamed to ``step_XXXXXXXX/`` by rank 0
only after every rank finished writing, so a half-written checkpoint is never picked up.
Contents: DCP shards of the model and optimizer (any DDP/FSDP2 layout, reshardable),
``trainer_state.json`` (step, data-loader position, metrics so far) and ``rank_<r>.pt`` with the
scheduler and per-rank RNG states (loaded with ``weights_only=True``).

Loading never executes code from a checkpoint: DCP's ``.metadata`` pickle is read (once, by
:class:`SafeFileSystemReader`, DCP never unpickles it) with an unpickler that admits an exact list of
(module, name) pairs: DCP's own metadata records, torch sizes/dtypes/layouts and paths. The state
file lists every file with its size, so a truncated or missing file is named before loading, and
``resume: auto`` falls back to the previous complete checkpoint when the newest is damaged.
"""

from __future__ import annotations

import errno
import json
import logging
import pickle
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from longshard.errors import CheckpointError, UnsafeCheckpointError
from longshard.files import copy_file, write_file
from longshard.parallel.deepspeed_engine import (
    DeepSpeedLoadRefused,
    check_deepspeed_files_safe,
    weights_only_loading,
)
from longshard.parallel.env import all_agree, all_sum
from longshard.train.checkpoint_keys import canonical_fqn, read_renamed, rename_fqns
from longshard.train.checkpoint_read import (  # noqa: F401 - the checkpoint API, re-exported
    CONFIG_FILE,
    DS_TAG,
    MAX_METADATA_BYTES,
    STATE_FILE,
    TOKENIZER_FILE,
    SafeFileSystemReader,
    SafeLoadPlanner,
    _find,
    _refusal,
    _wrapped,
    check_manifest,
    check_metadata_safe,
    checkpoint_step,
    complete_checkpoints,
    file_crc32,
    file_manifest,
    read_dcp,
    read_metadata_safe,
    read_trainer_state,
)
from longshard.train.fingerprint import check_resume
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)


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


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _out_of_space(error: BaseException) -> bool:
    """Whether ``error`` (or what it wraps: causes, DCP's per-rank failures) is a full disk. torch.save
    reports it as "unexpected pos N vs M" from its zip writer, DCP as the OSError inside its failures."""
    for e in _wrapped(error):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text or "unexpected pos" in text:
            return True
    return False


class DCPStates:
    """How the native engine's model and optimizer reach a checkpoint folder and come back:
    torch.distributed.checkpoint (DDP or FSDP2; each rank writes its shards), read through the safe
    reader (:func:`read_dcp`). The engine hands this to the :class:`Checkpointer`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def snapshot(self) -> dict:
        """The state to write (taken once: the byte estimate and the write use the same tensors)."""
        live = dict(zip(("model", "optim"), get_state_dict(self.model, self.optimizer)))
        return rename_fqns(live, canonical_fqn)  # the unwrapped model's names: loadable in any layout

    def local_bytes(self, snapshot: dict, rank: int) -> int:
        """Bytes this rank writes: DTensor shards by every rank, replicated tensors once (rank 0)."""
        local = 0
        for t in _tensors(snapshot):
            if isinstance(t, DTensor):
                local += t.to_local().numel() * t.element_size()
            elif rank == 0:
                local += t.numel() * t.element_size()
        return local

    def write(self, folder: Path, snapshot: dict) -> None:
        dcp.save(snapshot, checkpoint_id=str(folder))

    def verify(self, path: Path) -> None:
        """This rank's checks before any collective read: the DCP metadata exists and runs no code."""
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"{path / '.metadata'} is missing: the DCP checkpoint is incomplete.")
        check_metadata_safe(path)

    def read(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = read_renamed({"model": model_sd, "optim": optim_sd}, path, read_dcp, checkpoint_keys(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class DeepSpeedStates:
    """How a DeepSpeed engine's ZeRO-partitioned states reach a checkpoint folder (``deepspeed/``, in
    DeepSpeed's own collective format) and come back (files checked first, read with weights_only)."""

    def __init__(self, engine: nn.Module) -> None:
        self.engine = engine

    def snapshot(self) -> None:
        return None  # the partitioned states are not enumerable before DeepSpeed writes them

    def local_bytes(self, snapshot: None, rank: int) -> int:
        """Weights, fp32 master copy and two Adam moments, counted once (rank 0)."""
        return 4 * sum(p.numel() * 4 for p in self.engine.parameters()) if rank == 0 else 0

    def write(self, folder: Path, snapshot: None) -> None:
        self.engine.save_checkpoint(str(folder), tag=DS_TAG, save_latest=False)

    def verify(self, path: Path) -> None:
        if not (path / DS_TAG).is_dir():
            raise CheckpointError(f"{path / DS_TAG} is missing: {path} was not written by the deepspeed engine.")
        try:
            check_deepspeed_files_safe(path / DS_TAG)
        except DeepSpeedLoadRefused as e:
            raise CheckpointError(str(e)) from None

    def read(self, path: Path) -> None:
        try:  # files checked against the manifest written with them; read with weights_only=True
            with weights_only_loading(str(path)):
                self.engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
        except Exception as e:
            raise CheckpointError(f"failed to read DeepSpeed checkpoint {path / DS_TAG}: {e}") from e


class Checkpointer:
    """Save/load training state.

    Args:
        root: checkpoint folder.
        keep_last: complete checkpoints to keep.
        rank: this process's rank (rank 0 renames, prunes and writes the JSON state).
        config_yaml: the resolved config, saved as ``config.yaml`` in every checkpoint.
        fingerprint: what identifies this run's model and data (refuses resuming another run).
        allow_changes: fingerprint fields that may differ on resume.
        tokenizer: ``data.tokenizer``, copied into every checkpoint as ``tokenizer.json``.
    """

    def __init__(self, root: str | Path, keep_last: int, rank: int, config_yaml: str = "",
                 fingerprint: dict | None = None, allow_changes: list[str] | None = None,
                 tokenizer: str | Path | None = None) -> None:
        self.root, self.keep_last, self.rank = Path(root), keep_last, rank
        self.config_yaml = config_yaml
        self.tokenizer = Path(tokenizer) if tokenizer else None
        if self.tokenizer is not None and self.tokenizer.is_dir():  # a tokenizer folder: its tokenizer.json
            self.tokenizer = self.tokenizer / TOKENIZER_FILE
        self.fingerprint, self.allow_changes = fingerprint, list(allow_changes or [])
        self.last_save_s: float | None = None  # seconds the last save took (rank 0)

    def save(self, step: int, states: DCPStates | DeepSpeedStates, scheduler: Any, trainer_state: dict) -> Path:
        """Write checkpoint ``step`` (collective: every rank must call it); ``states`` is the engine's
        writer of its model and optimizer. Whatever stops it (a failed collective: a peer died or hung),
        rank 0 removes the unfinished ``step_XXXXXXXX.tmp`` folder before the error goes on."""
        tmp = self.root / f"step_{step:08d}.tmp"
        try:
            return self._save(step, states, scheduler, trainer_state)
        except BaseException:
            if self.rank == 0 and tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _save(self, step: int, states: DCPStates | DeepSpeedStates, scheduler: Any, trainer_state: dict) -> Path:
        t0 = time.monotonic()
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.rank == 0:
            if tmp.is_symlink():  # never write a checkpoint through a link (or delete what it points at)
                tmp.unlink()
            elif tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist.barrier()
        snapshot = states.snapshot()
        need = self._bytes_needed(states, snapshot)
        free = shutil.disk_usage(tmp).free
        if not all_agree(free >= need):  # refused before a byte is written: the last checkpoint stays usable
            self._discard(tmp)
            raise CheckpointError(self._no_space(tmp, need, free))
        problem: BaseException | None = None
        try:
            states.write(tmp, snapshot)
            extra = {"scheduler": scheduler.state_dict(), "rng": rng_state()}
            torch.save(extra, tmp / f"rank_{self.rank}.pt")
        except (Exception, CheckpointException) as e:  # DCP's own error derives from BaseException
            problem = e
        self._agreed(problem, tmp, need, free)
        try:
            if self.rank == 0:
                write_file(tmp / CONFIG_FILE, self.config_yaml)
                if self.tokenizer is not None and self.tokenizer.is_file():
                    copy_file(self.tokenizer, tmp / TOKENIZER_FILE)
        except OSError as e:  # a disk that fills on these last kilobytes: named, nothing left behind
            problem = e
        self._agreed(problem, tmp, need, free)
        world = dist.get_world_size()
        shares: list = [None] * world  # every rank checksums its share of the files
        dist.all_gather_object(shares, file_manifest(tmp, world, self.rank))
        try:
            if self.rank == 0:
                files = {k: v for share in shares for k, v in share.items()}
                self.last_save_s = round(time.monotonic() - t0, 3)  # what `launch slurm` sizes its lead from
                state = {"step": step, **trainer_state, "files": files, "fingerprint": self.fingerprint,
                         "save_s": self.last_save_s}
                write_file(tmp / STATE_FILE, json.dumps(state, indent=2))
        except OSError as e:
            problem = e
        self._agreed(problem, tmp, need, free)
        if self.rank == 0:
            if final.exists():  # a damaged or incomplete folder of this step: keep it aside, never delete it
                aside = final.with_name(f"{final.name}.replaced-{int(time.time())}")
                final.rename(aside)
                log.warning("%s existed without loading (damaged or incomplete); moved it to %s", final, aside)
            tmp.rename(final)
            for old in self._same_model(complete_checkpoints(self.root))[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        log.info("saved checkpoint %s", final)
        return final

    def _agreed(self, problem: BaseException | None, tmp: Path, need: int, free: int) -> None:
        """Every rank learns whether any rank's part of the save failed; if one did, the folder is removed
        and every rank raises a CheckpointError (a full disk named as such)."""
        if all_agree(problem is None):
            return
        self._discard(tmp)
        if problem is None:
            raise CheckpointError(f"writing checkpoint {tmp} failed on another rank (see its log); the folder "
                                  "was removed and the previous checkpoint is intact.")
        if _out_of_space(problem):
            raise CheckpointError(self._no_space(tmp, need, free)) from None
        raise CheckpointError(f"writing checkpoint {tmp} failed on rank {self.rank}: {str(problem)[:1000]}; "
                              "the folder was removed and the previous checkpoint is intact.") from problem

    def _bytes_needed(self, states: DCPStates | DeepSpeedStates, snapshot: dict | None) -> int:
        """Bytes checkpoint ``step`` will take (collective): the newest complete checkpoint's size when
        there is one, else what the engine's states say each rank writes."""
        latest = self.latest()
        if latest is not None:
            return sum(f.stat().st_size for f in latest.rglob("*") if f.is_file())
        return int(all_sum(states.local_bytes(snapshot, self.rank)))

    def _discard(self, tmp: Path) -> None:
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    def _no_space(self, tmp: Path, need: int, free: int) -> str:
        latest = self.latest()
        return (f"no space left on device writing {tmp}: about {need / 1e6:.1f} MB needed, {free / 1e6:.1f} MB "
                f"free before writing. Nothing was kept of it; the previous checkpoint ({latest or 'none'}) is "
                "intact. Fix: free space, lower checkpoint.keep_last, or set checkpoint.dir on a larger disk, "
                "then resume with checkpoint.resume=auto.")

    def _same_model(self, paths: list[Path]) -> list[Path]:
        """The checkpoints of this run's model (pruning never deletes another model's checkpoints)."""
        if self.fingerprint is None:
            return paths
        keep = []
        for p in paths:
            try:
                saved = read_trainer_state(p).get("fingerprint")
            except CheckpointError:
                continue
            if saved is None or saved.get("model") == self.fingerprint["model"]:
                keep.append(p)
        return keep

    def latest(self) -> Path | None:
        """Newest complete checkpoint, or None."""
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def load_latest(self, states: DCPStates | DeepSpeedStates, scheduler: Any) -> tuple[Path | None, dict | None]:
        """Load the newest checkpoint that loads; damaged ones are reported and skipped.

        Every rank checks the same files, so all ranks agree on the checkpoint they take.
        """
        errors = []
        for path in reversed(complete_checkpoints(self.root)):
            unsafe = False
            try:
                state = self.load(path, states, scheduler)
                error = None
            except CheckpointError as e:
                state, error, unsafe = None, str(e), isinstance(e, UnsafeCheckpointError)
            if all_agree(error is None):  # all ranks loaded this one: take it
                return path, state
            if not all_agree(not unsafe):  # tampered, not damaged: stop, never fall back past it
                raise UnsafeCheckpointError(error or f"{path}: another rank found a file that would run code "
                                            "(see that rank's log); nothing was loaded.")
            # some rank could not load it (its own files): every rank falls back together
            error = error or f"{path}: another rank could not load its part (see that rank's log)"
            log.warning("skipping damaged checkpoint: %s", error)
            errors.append(error)
        if errors:  # checkpoints exist but none loads: never restart from scratch silently
            raise CheckpointError("no checkpoint under " f"{self.root} loads: " + " | ".join(errors))
        return None, None

    def _verify(self, path: Path, states: DCPStates | DeepSpeedStates) -> tuple[dict, dict]:
        """This rank's checks of ``path`` before any collective read: state file, manifest (sizes, its
        share of the checksums), DCP metadata safety, its scheduler/RNG file. Returns (trainer state,
        that file's contents)."""
        trainer_state = read_trainer_state(path)
        if self.fingerprint is not None:  # a different run is refused here, before any file is read
            trainer_state["changed"] = check_resume(trainer_state.get("fingerprint"), self.fingerprint,
                                                    self.allow_changes, str(path))
        world = dist.get_world_size() if dist.is_initialized() else 1
        check_manifest(path, trainer_state.get("files", {}), world, self.rank)
        states.verify(path)
        extra_file = path / f"rank_{self.rank}.pt"
        if not extra_file.is_file():  # resumed with more ranks than saved: take rank 0's schedule
            extra_file = path / "rank_0.pt"
        try:
            extra = torch.load(extra_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"{extra_file} would import more than tensors and plain data "
                                        f"({_refusal(e)}); nothing was loaded or run. Delete that "
                                        "checkpoint.") from None
        except Exception as e:
            raise CheckpointError(f"{extra_file} is corrupt: {e}") from e
        return trainer_state, extra

    def load(self, path: str | Path, states: DCPStates | DeepSpeedStates, scheduler: Any) -> dict:
        """Restore model, optimizer, scheduler and RNG from ``path``; return the trainer state.

        Collective: every rank verifies its part first and all agree before the (collective) read, so
        a file only one rank finds damaged fails every rank alike instead of hanging the others.
        """
        path = Path(path)
        try:
            trainer_state, extra = self._verify(path, states)
            problem = None
        except CheckpointError as e:
            problem = e
        if not all_agree(problem is None):
            raise problem or CheckpointError(f"{path}: another rank found its part damaged (see that rank's log).")
        states.read(path)
        scheduler.load_state_dict(extra["scheduler"])
        set_rng_state(extra["rng"])
        log.info("resumed from %s (step %d)", path, trainer_state["step"])
        return trainer_state


def checkpoint_keys(path: Path) -> list[str]:
    """The state keys a DCP checkpoint holds (its metadata, read by the safe reader)."""
    return list(read_metadata_safe(path).state_dict_metadata)


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Load only the model weights of checkpoint ``path`` into an unwrapped model (any process count)."""
    path = Path(path)
    if path.name.endswith(".tmp") or (path / STATE_FILE).exists():
        check_manifest(path, read_trainer_state(path)["files"])
    else:  # a bare DCP folder (written by hand or by another tool): loadable, but nothing to verify it against
        log.warning("%s has no %s: its files cannot be checked against a manifest", path, STATE_FILE)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path / '.metadata'} is missing: {path} is not a complete DCP checkpoint.")
    check_metadata_safe(path)
    state = read_renamed({"model": model.state_dict()}, path, read_dcp, checkpoint_keys(path))
    model.load_state_dict(state["model"])
