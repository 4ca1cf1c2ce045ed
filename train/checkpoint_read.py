"""What a complete checkpoint folder holds, and reading it without running or trusting its contents.

A complete checkpoint is a folder ``step_XXXXXXXX`` (never ``*.tmp``) with ``trainer_state.json``
(checked field by field, listing every file with its size and CRC-32) and DCP's ``.metadata``, read
once into memory and unpickled by the restricted unpickler of :mod:`longshard.train.safe_pickle`;
its storage entries must be regular files inside the folder. Tensors and bytes entries are read by
DCP through :class:`SafeLoadPlanner` (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from longshard.errors import CheckpointError, UnsafeCheckpointError
from longshard.files import is_regular_inside, read_json, read_regular
from longshard.train.safe_pickle import UnsafePickleError, check_dcp_metadata, restricted_loads
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

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
