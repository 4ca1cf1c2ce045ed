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
import io
import json
import logging
import os
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
from longshard.errors import CheckpointError, UnsafeCheckpointError
from longshard.files import copy_file, is_regular_inside, read_json, read_regular, write_file
from longshard.parallel.deepspeed_engine import (
    DeepSpeedLoadRefused,
    check_deepspeed_files_safe,
    weights_only_loading,
)
from longshard.parallel.env import all_agree, all_sum
from longshard.train.fingerprint import check_resume
from longshard.train.safe_pickle import UnsafePickleError, check_dcp_metadata, restricted_loads
from torch import nn
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
MAX_METADATA_BYTES = 2**30  # DCP metadata of a 70B model with its optimizer is tens of MB
TOKENIZER_FILE = "tokenizer.json"  # a copy of data.tokenizer, so a checkpoint is usable on another machine


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with the one unsafe step replaced: ``.metadata`` is read once into memory
    and unpickled by :class:`~longshard.train.safe_pickle.RestrictedUnpickler` (exact allow-list),
    so DCP never unpickles a checkpoint file itself and nothing can be swapped between a check and
    its use. The result must be a DCP ``Metadata`` whose storage entries name files inside the
    checkpoint folder with non-negative offsets. Tensors are read by DCP with
    ``torch.load(weights_only=True)``; bytes entries by :class:`SafeLoadPlanner`.
    """

    refused: UnsafeCheckpointError | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.refused is not None:  # DCP retries with a rank-local file after a failure: never past a refusal
            raise self.refused
        try:
            return read_metadata_safe(Path(self.path), kwargs.get("rank"), load_id=self.load_id)
        except UnsafeCheckpointError as e:
            self.refused = e
            raise


def read_metadata_safe(path: Path, rank: int | None = None, load_id: str | None = None) -> Metadata:
    """DCP metadata of checkpoint ``path``, read with the restricted unpickler and checked.

    Raises:
        CheckpointError: naming the file and what it refused (a global, an opcode, a path).
    """
    meta = path / (".metadata" if rank is None else f"__{rank}.metadata")
    try:
        data = read_regular(meta, MAX_METADATA_BYTES)
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(f"{meta} cannot be read ({why}).") from None
    try:
        metadata = restricted_loads(data)
    except UnsafePickleError as e:
        raise UnsafeCheckpointError(f"{meta} would run code or exhaust memory while loading ({e}); nothing was "
                                    "loaded or run. Delete that checkpoint: never load checkpoints from a source you "
                                    "do not trust.") from None
    except (Exception, RecursionError) as e:
        raise CheckpointError(f"{meta} is corrupt or not a plain DCP metadata file ({str(e)[:300]}); not loading "
                              "it.") from None
    wrong = check_dcp_metadata(metadata)
    if wrong is not None:
        raise CheckpointError(f"{meta} does not hold well-formed DCP metadata: {wrong}; not loading it.")
    for index, info in (metadata.storage_data or {}).items():
        name, offset, length = info.relative_path, info.offset, info.length
        outside = not name or "/" in name or "\\" in name or name in (".", "..") or offset < 0 or length < 0
        if not outside and not os.path.lexists(path / name):
            raise CheckpointError(f"{path / name} is missing: the checkpoint is incomplete.")
        if outside or not is_regular_inside(path / name, path):
            raise UnsafeCheckpointError(f"{meta} describes entry {index.fqn!r} at {name!r} [{offset}, +{length}]: "
                                        "not a file of this checkpoint folder (a path outside it, a link or not a "
                                        "regular file); not loading it.")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    if load_id is not None:
        metadata.storage_meta.load_id = load_id
    return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP load planner that reads non-tensor entries (optimizer ``param_groups`` and other bytes
    items) with ``torch.load(weights_only=True)``: plain containers and numbers only, never code.
    (DCP's default planner unpickles them without that restriction.)"""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(f"entry {read_item.dest_index.fqn!r} is not plain data; not loading it "
                                        f"({_refusal(e)})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def read_dcp(state: dict, path: Path) -> None:
    """``dcp.load`` of ``state`` from ``path`` through the safe reader and planner (collective when a
    process group is up). Raises UnsafeCheckpointError when any rank's read refused a pickle, else
    CheckpointError naming the folder."""
    reader = SafeFileSystemReader(str(path))
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
    except (Exception, CheckpointException) as e:  # DCP's own error derives from BaseException
        unsafe = reader.refused or _find(e, (UnsafeCheckpointError, pickle.UnpicklingError))
        if unsafe is not None:
            raise UnsafeCheckpointError(f"{path}: {_refusal(unsafe)}; nothing was loaded or run. Delete that "
                                        "checkpoint.") from None
        raise CheckpointError(f"failed to read DCP checkpoint {path}: {str(e)[:2000]}") from e


def _wrapped(error: BaseException) -> Iterator[BaseException]:
    """``error``, its causes and contexts, and DCP's per-rank failures inside it."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]
        todo += [e.__cause__, e.__context__, *failures]  # DCP keeps (exception, traceback) per rank


def _find(error: BaseException, kinds: tuple[type, ...]) -> BaseException | None:
    """The first error of ``kinds`` in ``error`` or what it wraps."""
    return next((e for e in _wrapped(error) if isinstance(e, kinds)), None)


def check_metadata_safe(path: Path) -> None:
    """Read ``path/.metadata`` as :class:`SafeFileSystemReader` does (raises CheckpointError naming the file):
    a damaged or unsafe file is found before any collective read."""
    read_metadata_safe(Path(path))


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


def _refusal(error: BaseException) -> str:
    """The line of a ``weights_only`` refusal that names the global (torch's message starts with advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "global" in line), lines[0] if lines else "")[:300]


def _is_int(x: Any) -> bool:
    return type(x) is int and x >= 0


def read_trainer_state(path: Path) -> dict[str, Any]:
    """``trainer_state.json`` of checkpoint ``path``, checked field by field (raises CheckpointError
    naming the file and the field): a complete checkpoint's folder is ``step_XXXXXXXX`` (never
    ``*.tmp``), its state says the same step, lists every file as [size, crc32] (or a size), and holds
    the data-loader position."""
    path = Path(path)
    state_file = path / STATE_FILE
    found = _STEP_RE.match(path.name)
    if found is None:
        what = "an unfinished write (``*.tmp``)" if path.name.endswith(".tmp") else "not a checkpoint folder"
        raise CheckpointError(f"{path} is {what}: complete checkpoints are folders named step_XXXXXXXX.")
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing: {path} is not a complete checkpoint.")
    try:
        state = read_json(state_file, follow_links=False)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{state_file} is corrupt: {e}") from None

    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{state_file} is corrupt: {field} {why}.")

    if not isinstance(state, dict):
        raise bad("the file", f"holds a {type(state).__name__}, not an object")
    if not _is_int(state.get("step")) or state["step"] != int(found.group(1)):
        raise bad("step", f"is {state.get('step')!r}, the folder says {int(found.group(1))}")
    files = state.get("files")
    if not isinstance(files, dict) or not files:
        raise bad("files", "is not a non-empty object of file -> [size, crc32]")
    for name, entry in files.items():
        ok = _is_int(entry) or (isinstance(entry, list) and len(entry) == 2 and all(map(_is_int, entry)))
        if not ok or Path(name).is_absolute() or ".." in Path(name).parts:
            raise bad(f"files[{name!r}]", f"is {entry!r}, not [size, crc32] of a file inside the checkpoint")
    loader = state.get("loader")
    if not isinstance(loader, dict) or not all(_is_int(loader.get(k)) for k in ("epoch", "index")):
        raise bad("loader", f"is {loader!r}, not the data-loader position {{epoch, index, ...}}")
    if not isinstance(state.get("losses", []), list):
        raise bad("losses", "is not a list")
    if not isinstance(state.get("fingerprint"), (dict, type(None))):
        raise bad("fingerprint", "is not an object")
    return state


def check_manifest(path: Path, manifest: dict[str, Any], world_size: int = 1, rank: int = 0) -> None:
    """Every file listed at save time is present with its size and checksum (raises CheckpointError
    naming it). Sizes are checked for every file; this rank verifies the checksums of its share (every
    world_size-th file), so ranks must agree on the verdict (:meth:`Checkpointer.load_latest` does).
    Manifests of older checkpoints hold sizes only."""
    for i, (name, entry) in enumerate(sorted(manifest.items())):
        size, crc = (entry, None) if isinstance(entry, int) else entry
        f = path / name
        if not is_regular_inside(f, path):
            what = "a link or not a regular file" if os.path.lexists(f) else "missing from the checkpoint"
            raise CheckpointError(f"{f} is {what}; a checkpoint's files are never read through links.")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f} is truncated or altered: {f.stat().st_size} bytes, {size} when saved.")
        if crc is not None and i % world_size == rank and file_crc32(f) != crc:
            raise CheckpointError(f"{f} is corrupt: its checksum differs from the one written with it.")


def checkpoint_step(path: str | Path) -> int | None:
    """The step a checkpoint folder holds by its name (``step_00000300`` -> 300), or None."""
    found = _STEP_RE.match(Path(path).name)
    return int(found.group(1)) if found else None


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
        return dict(zip(("model", "optim"), get_state_dict(self.model, self.optimizer)))

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
        state = {"model": model_sd, "optim": optim_sd}
        read_dcp(state, path)
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
    state = {"model": model.state_dict()}
    read_dcp(state, path)
    model.load_state_dict(state["model"])
