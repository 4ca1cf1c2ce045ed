"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint is written into ``step_XXXXXXXX.tmp/`` and renamed to ``step_XXXXXXXX/`` by rank 0
only after every rank finished writing, so a half-written checkpoint is never picked up.
Contents: DCP shards of the model and optimizer (any DDP/FSDP2 layout, reshardable),
``trainer_state.json`` (step, data-loader position, metrics so far) and ``rank_<r>.pt`` with the
scheduler and per-rank RNG states (loaded with ``weights_only=True``).

Loading never executes code from a checkpoint: DCP's ``.metadata`` pickle is first read with an
unpickler that only admits DCP's own metadata classes, torch sizes/dtypes and paths. The state
file lists every file with its size, so a truncated or missing file is named before loading, and
``resume: auto`` falls back to the previous complete checkpoint when the newest is damaged.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import pickle
import random
import re
import shutil
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from longshard.parallel.deepspeed_engine import (
    DeepSpeedLoadRefused,
    check_deepspeed_files_safe,
    is_deepspeed_engine,
    weights_only_loading,
)
from longshard.parallel.env import all_agree, all_sum
from longshard.train.fingerprint import check_resume
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt (the message names the file)."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler for DCP ``.metadata`` that refuses every global outside an allow-list."""

    def find_class(self, module: str, name: str):
        allowed = (
            module.startswith("torch.distributed.checkpoint.")
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
            or (module == "torch.serialization" and name == "_get_layout")
            or (module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"))
            or (module == "collections" and name == "OrderedDict")
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP load planner that reads non-tensor entries (optimizer ``param_groups`` and other bytes
    items) with ``torch.load(weights_only=True)``: plain containers and numbers only, never code.
    (DCP's default planner unpickles them without that restriction.)"""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"entry {read_item.dest_index.fqn!r} is not plain data; not loading it ({e})") from e
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def check_metadata_safe(path: Path) -> None:
    """Read ``path/.metadata`` with the restricted unpickler (raises CheckpointError naming the file)."""
    meta = path / ".metadata"
    try:
        with open(meta, "rb") as f:
            _MetadataUnpickler(f).load()
    except Exception as e:
        raise CheckpointError(f"{meta} is corrupt or not a plain DCP metadata file ({e}); not loading it.") from e


def file_crc32(path: Path, chunk: int = 16 * 2**20) -> int:
    """CRC-32 of a file's bytes (zlib; about 1 GB/s per core)."""
    crc = 0
    with open(path, "rb") as f:
        while data := f.read(chunk):
            crc = zlib.crc32(data, crc)
    return crc


def file_manifest(folder: Path, world_size: int = 1, rank: int = 0) -> dict[str, list[int]]:
    """Relative path -> [size, crc32] of every file in a checkpoint folder (the state file excepted).

    With ``world_size > 1`` this rank checksums only its share of the files (every world_size-th);
    the shares are gathered by :meth:`Checkpointer.save`.
    """
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STATE_FILE]
    return {str(p.relative_to(folder)): [p.stat().st_size, file_crc32(p)]
            for i, p in enumerate(files) if i % world_size == rank}


DS_TAG = "deepspeed"  # subfolder of a checkpoint holding DeepSpeed's own files


def check_manifest(path: Path, manifest: dict[str, Any], world_size: int = 1, rank: int = 0) -> None:
    """Every file listed at save time is present with its size and checksum (raises CheckpointError
    naming it). Sizes are checked for every file; this rank verifies the checksums of its share (every
    world_size-th file), so ranks must agree on the verdict (:meth:`Checkpointer.load_latest` does).
    Manifests of older checkpoints hold sizes only."""
    for i, (name, entry) in enumerate(sorted(manifest.items())):
        size, crc = (entry, None) if isinstance(entry, int) else entry
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing from the checkpoint.")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f} is truncated or altered: {f.stat().st_size} bytes, {size} when saved.")
        if crc is not None and i % world_size == rank and file_crc32(f) != crc:
            raise CheckpointError(f"{f} is corrupt: its checksum differs from the one written with it.")


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
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text or "unexpected pos" in text:
            return True
        todo += [e.__cause__, e.__context__, *getattr(e, "failures", {}).values()]
    return False


class Checkpointer:
    """Save/load training state.

    Args:
        root: checkpoint folder.
        keep_last: complete checkpoints to keep.
        rank: this process's rank (rank 0 renames, prunes and writes the JSON state).
    """

    def __init__(self, root: str | Path, keep_last: int, rank: int, config_yaml: str = "",
                 fingerprint: dict | None = None, allow_changes: list[str] | None = None) -> None:
        self.root, self.keep_last, self.rank = Path(root), keep_last, rank
        self.config_yaml = config_yaml
        self.fingerprint, self.allow_changes = fingerprint, list(allow_changes or [])

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
        deepspeed = is_deepspeed_engine(model)
        state = None if deepspeed else dict(zip(("model", "optim"), get_state_dict(model, optimizer)))
        need = self._bytes_needed(model, state)
        free = shutil.disk_usage(tmp).free
        if not all_agree(free >= need):  # refused before a byte is written: the last checkpoint stays usable
            self._discard(tmp)
            raise CheckpointError(self._no_space(tmp, need, free))
        problem: BaseException | None = None
        try:
            if deepspeed:  # ZeRO-partitioned states: DeepSpeed's own (collective) format
                model.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
            else:
                dcp.save(state, checkpoint_id=str(tmp))
            extra = {"scheduler": scheduler.state_dict(), "rng": rng_state()}
            torch.save(extra, tmp / f"rank_{self.rank}.pt")
        except (Exception, CheckpointException) as e:  # DCP's own error derives from BaseException
            problem = e
        if not all_agree(problem is None):
            self._discard(tmp)
            if problem is None:
                raise CheckpointError(f"writing checkpoint {tmp} failed on another rank (see its log); the folder "
                                      "was removed and the previous checkpoint is intact.")
            if _out_of_space(problem):
                raise CheckpointError(self._no_space(tmp, need, free)) from None
            raise CheckpointError(f"writing checkpoint {tmp} failed on rank {self.rank}: {str(problem)[:1000]}; "
                                  "the folder was removed and the previous checkpoint is intact.") from problem
        dist.barrier()
        if self.rank == 0:
            (tmp / CONFIG_FILE).write_text(self.config_yaml)
        dist.barrier()
        world = dist.get_world_size()
        shares: list = [None] * world  # every rank checksums its share of the files
        dist.all_gather_object(shares, file_manifest(tmp, world, self.rank))
        if self.rank == 0:
            files = {k: v for share in shares for k, v in share.items()}
            state = {"step": step, **trainer_state, "files": files, "fingerprint": self.fingerprint}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
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

    def _bytes_needed(self, model: nn.Module, state: dict | None) -> int:
        """Bytes checkpoint ``step`` will take (collective): the newest complete checkpoint's size when
        there is one, else the tensors each rank writes (DTensor shards by every rank, replicated tensors
        once) plus, for DeepSpeed, weights, fp32 master copy and two Adam moments."""
        latest = self.latest()
        if latest is not None:
            return sum(f.stat().st_size for f in latest.rglob("*") if f.is_file())
        local = 0
        if state is None:  # deepspeed: the partitioned states are not enumerable before they are written
            if self.rank == 0:
                local = 4 * sum(p.numel() * 4 for p in model.parameters())
        else:
            for t in _tensors(state):
                if isinstance(t, DTensor):
                    local += t.to_local().numel() * t.element_size()
                elif self.rank == 0:
                    local += t.numel() * t.element_size()
        return int(all_sum(local))

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
                saved = json.loads((p / STATE_FILE).read_text()).get("fingerprint")
            except (OSError, ValueError):
                continue
            if saved is None or saved.get("model") == self.fingerprint["model"]:
                keep.append(p)
        return keep

    def latest(self) -> Path | None:
        """Newest complete checkpoint, or None."""
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def load_latest(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> tuple[Path | None, dict | None]:
        """Load the newest checkpoint that loads; damaged ones are reported and skipped.

        Every rank checks the same files, so all ranks agree on the checkpoint they take.
        """
        errors = []
        for path in reversed(complete_checkpoints(self.root)):
            try:
                state = self.load(path, model, optimizer, scheduler)
                error = None
            except CheckpointError as e:
                state, error = None, str(e)
            if all_agree(error is None):  # all ranks loaded this one: take it
                return path, state
            # some rank could not load it (its own files): every rank falls back together
            error = error or f"{path}: another rank could not load its part (see that rank's log)"
            log.warning("skipping damaged checkpoint: %s", error)
            errors.append(error)
        if errors:  # checkpoints exist but none loads: never restart from scratch silently
            raise CheckpointError("no checkpoint under " f"{self.root} loads: " + " | ".join(errors))
        return None, None

    def _verify(self, path: Path, deepspeed: bool) -> tuple[dict, dict]:
        """This rank's checks of ``path`` before any collective read: state file, manifest (sizes, its
        share of the checksums), DCP metadata safety, its scheduler/RNG file. Returns (trainer state,
        that file's contents)."""
        state_file = path / STATE_FILE
        if not state_file.is_file():
            raise CheckpointError(f"{state_file} is missing: {path} is not a complete checkpoint.")
        try:
            trainer_state = json.loads(state_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{state_file} is corrupt: {e}") from e
        if self.fingerprint is not None:  # a different run is refused here, before any file is read
            trainer_state["changed"] = check_resume(trainer_state.get("fingerprint"), self.fingerprint,
                                                    self.allow_changes, str(path))
        world = dist.get_world_size() if dist.is_initialized() else 1
        check_manifest(path, trainer_state.get("files", {}), world, self.rank)
        if deepspeed:
            if not (path / DS_TAG).is_dir():
                raise CheckpointError(f"{path / DS_TAG} is missing: {path} was not written by the deepspeed engine.")
            try:
                check_deepspeed_files_safe(path / DS_TAG)
            except DeepSpeedLoadRefused as e:
                raise CheckpointError(str(e)) from None
        else:
            if not (path / ".metadata").is_file():
                raise CheckpointError(f"{path / '.metadata'} is missing: the DCP checkpoint is incomplete.")
            check_metadata_safe(path)
        extra_file = path / f"rank_{self.rank}.pt"
        if not extra_file.is_file():  # resumed with more ranks than saved: take rank 0's schedule
            extra_file = path / "rank_0.pt"
        try:
            extra = torch.load(extra_file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{extra_file} is corrupt: {e}") from e
        return trainer_state, extra

    def load(
        self, path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
    ) -> dict:
        """Restore model, optimizer, scheduler and RNG from ``path``; return the trainer state.

        Collective: every rank verifies its part first and all agree before the (collective) read, so
        a file only one rank finds damaged fails every rank alike instead of hanging the others.
        """
        path = Path(path)
        deepspeed = is_deepspeed_engine(model)
        try:
            trainer_state, extra = self._verify(path, deepspeed)
            problem = None
        except CheckpointError as e:
            problem = e
        if not all_agree(problem is None):
            raise problem or CheckpointError(f"{path}: another rank found its part damaged (see that rank's log).")
        if deepspeed:
            try:  # files checked against the manifest written with them; read with weights_only=True
                with weights_only_loading(str(path)):
                    model.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
            except Exception as e:
                raise CheckpointError(f"failed to read DeepSpeed checkpoint {path / DS_TAG}: {e}") from e
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            try:
                dcp.load(state, checkpoint_id=str(path), planner=SafeLoadPlanner())
            except (Exception, CheckpointException) as e:  # DCP's own error derives from BaseException
                raise CheckpointError(f"failed to read DCP checkpoint {path}: {str(e)[:2000]}") from e
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        scheduler.load_state_dict(extra["scheduler"])
        set_rng_state(extra["rng"])
        log.info("resumed from %s (step %d)", path, trainer_state["step"])
        return trainer_state


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Load only the model weights of checkpoint ``path`` into an unwrapped model (any process count)."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path / '.metadata'} is missing: {path} is not a complete DCP checkpoint.")
    state_file = path / STATE_FILE
    if state_file.is_file():
        try:
            check_manifest(path, json.loads(state_file.read_text()).get("files", {}))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{state_file} is corrupt: {e}") from e
    check_metadata_safe(path)
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=str(path), planner=SafeLoadPlanner())
    except (Exception, CheckpointException) as e:
        raise CheckpointError(f"failed to read DCP checkpoint {path}: {e}") from e
    model.load_state_dict(state["model"])
