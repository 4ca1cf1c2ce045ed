"""An exclusive lock on a run's output directory, so two runs never write into the same one.

Rank 0 creates ``output_dir/.lock`` atomically (``O_CREAT | O_EXCL``) holding its pid, host and
start time, and refreshes its modification time while training (the heartbeat). A lock is stale,
and taken over with a warning, when its holder is a dead process on this host, or when its
heartbeat is older than ``stale_s`` (a holder on another host that died with its node). Anything
else is a live run: the second one stops before writing anything, naming the holder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from longshard.errors import ConfigError

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def check_writable(folder: str | Path, field: str) -> None:
    """Create ``folder`` if needed and prove a file can be written there (created, then removed), or
    raise a ConfigError naming ``field`` (read-only filesystem, missing permission, a file in the way)."""
    folder = Path(folder)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(field, f"cannot write to {folder}: {e.strerror or e} (errno {e.errno}).",
                          f"point {field} at a writable folder (not a read-only mount or another user's "
                          "folder).") from None


class RunLock:
    """``<folder>/.lock`` held by this process (rank 0) for the length of a run.

    Args:
        out_dir: the folder to lock (created if missing): the run's output directory, or another folder
            it writes into (``checkpoint.dir``).
        stale_s: a lock whose heartbeat is older than this is treated as abandoned.
        heartbeat_s: at most one heartbeat write per this many seconds.
        field: the config field that names the folder (for messages).
    """

    def __init__(self, out_dir: str | Path, stale_s: float = 900.0, heartbeat_s: float = 30.0,
                 field: str = "output_dir") -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self.field = field
        self.stale_s, self.heartbeat_s = stale_s, heartbeat_s
        self.held = False
        self._last = 0.0
        self.started: float | None = None  # the start time written into the lock (what every rank must read back)

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict) -> str | None:
        """Why the existing lock is abandoned, or None when its holder may be alive."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it disappeared"
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
                and not _pid_alive(holder["pid"]):
            return f"process {holder['pid']} on this host is gone"
        if age > self.stale_s:
            return f"its heartbeat is {age:.0f} s old (> {self.stale_s:.0f} s)"
        return None

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the run that holds it."""
        check_writable(self.path.parent, self.field)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                why = self._stale(holder)
                if why is None:
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                    raise ConfigError(
                        self.field, f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, started {since}; lock {self.path}).",
                        f"wait for it to finish, choose another {self.field}, or delete the lock file if that run "
                        "is dead.") from None
                log.warning("taking over the stale lock %s (%s)", self.path, why)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.started = me["started"]
            self.held = True
            self._last = time.time()
            return
        raise ConfigError(self.field, f"could not take the lock {self.path} (another run took it first).",
                          f"choose another {self.field}.")

    def seen_started(self) -> float | None:
        """The start time in the lock file as this process reads it (None: no readable lock here)."""
        started = self._holder().get("started")
        return started if isinstance(started, float) else None

    def heartbeat(self) -> None:
        """Refresh the lock's modification time (rate-limited)."""
        now = time.time()
        if self.held and now - self._last >= self.heartbeat_s:
            try:
                os.utime(self.path)
            except FileNotFoundError:  # removed under us: put it back rather than run unlocked
                self.path.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                 "started": now}))
            self._last = now

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held and self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False


class RunLocks:
    """Locks on every folder a run writes into, taken in order (all or none) and released together.

    Args:
        folders: (folder, config field) pairs; a folder listed twice is locked once.
        stale_s: see :class:`RunLock`.
    """

    def __init__(self, folders: list[tuple[str | Path, str]], stale_s: float = 900.0) -> None:
        seen, self.locks = set(), []
        for folder, field in folders:
            key = Path(folder).resolve()
            if key not in seen:
                seen.add(key)
                self.locks.append(RunLock(folder, stale_s=stale_s, field=field))

    def acquire(self) -> None:
        """Take every lock, or none (raises the ConfigError of the first folder in use)."""
        try:
            for lock in self.locks:
                lock.acquire()
        except ConfigError:
            self.release()
            raise

    def heartbeat(self) -> None:
        for lock in self.locks:
            lock.heartbeat()

    def release(self) -> None:
        for lock in self.locks:
            lock.release()


# what a run leaves in output_dir besides checkpoints (the lock stays: this run holds it)
RUN_FILES = ("config.yaml", "metrics.jsonl", "report.json", "wandb")


def set_aside_previous_run(out_dir: str | Path, ckpt_dir: str | Path) -> Path | None:
    """Move an earlier run's files out of the way of a fresh one (``checkpoint.resume=none``), unchanged,
    into ``output_dir/previous-<UTC time>/``: its config, metrics, report, wandb folder and checkpoints
    (``checkpoints/`` there, or ``<checkpoint.dir>/previous-<UTC time>/`` when checkpoint.dir lies outside
    output_dir). Nothing is deleted or relabelled. Call with the run's locks held. Returns the folder,
    or None when there was nothing to move.
    """
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    stamp = time.strftime("previous-%Y%m%dT%H%M%SZ", time.gmtime())
    tries = 1
    while (out_dir / stamp).exists() or (ckpt_dir / stamp).exists():  # two fresh starts within a second
        tries += 1
        stamp = f"{stamp.split('.')[0]}.{tries}"
    dest = out_dir / stamp
    files = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    steps = sorted(p for p in ckpt_dir.glob("step_*")) if ckpt_dir.is_dir() else []
    if not files and not steps:
        return None
    try:
        inside = ckpt_dir.resolve().relative_to(out_dir.resolve())
        ckpt_dest = dest / inside
    except ValueError:
        ckpt_dest = ckpt_dir / stamp
    for src, to in [(f, dest / f.name) for f in files] + [(p, ckpt_dest / p.name) for p in steps]:
        to.parent.mkdir(parents=True, exist_ok=True)
        src.rename(to)
    log.warning("checkpoint.resume=none: %s held an earlier run; its files (%s) were moved unchanged to %s%s. "
                "Delete that folder when it is not needed.", out_dir,
                ", ".join([f.name for f in files] + ([f"{len(steps)} checkpoint(s)"] if steps else [])), dest,
                f" and {ckpt_dest}" if steps and not str(ckpt_dest).startswith(str(dest)) else "")
    return dest
