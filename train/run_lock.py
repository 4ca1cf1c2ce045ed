"""An exclusive lock on a run's output directory, so two runs never write into the same one.

Rank 0 opens ``output_dir/.lock`` (``O_NOFOLLOW``: a link there is refused, never written through)
and takes an exclusive ``flock`` on it, held for the whole run, then writes its pid, host and start
time into it and refreshes its modification time while training (the heartbeat, through its own
descriptor). The kernel serialises ``flock``, so of any number of processes taking the lock at the
same instant (a stale one included) exactly one holds it; a holder that dies releases it with its
descriptors. The file's contents cover what ``flock`` cannot see: a holder on another node of a
filesystem whose locks are node-local (Lustre mounted with ``localflock``, NFS without lock
support). A lock is stale, and taken over with a warning, when its holder is a dead process on this
host or its heartbeat is older than ``stale_s`` (a holder on another host that died with its
node). Anything else is a live run: the second one stops before writing anything, naming the holder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

from longshard.errors import ConfigError
from longshard.files import load_json, probe_writable

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"
_MAX_LOCK_BYTES = 65536


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OverflowError, ValueError):  # not a pid at all
        return False
    return True


def check_writable(folder: str | Path, field: str) -> None:
    """Create ``folder`` if needed and prove a file can be written there (a random name created
    exclusively, never following a link, then removed), or raise a ConfigError naming ``field``
    (read-only filesystem, missing permission, a file in the way)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe_writable(folder)
    except OSError as e:
        raise ConfigError(field, f"cannot write to {folder}: {e.strerror or e} (errno {e.errno}).",
                          f"point {field} at a writable folder (not a read-only mount or another user's "
                          "folder).") from None


def parse_holder(data: bytes) -> dict[str, Any]:
    """The holder a lock file names: ``{pid: int, host: str, started: float}`` with whichever of those
    fields are well formed (a damaged or foreign file gives ``{}``; never an exception)."""
    try:
        raw = load_json(data, max_depth=4, max_bytes=_MAX_LOCK_BYTES)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(raw, dict):
        return {}
    out: dict[str, Any] = {}
    if type(raw.get("pid")) is int and raw["pid"] > 0:
        out["pid"] = raw["pid"]
    if isinstance(raw.get("host"), str):
        out["host"] = raw["host"][:255]
    if type(raw.get("started")) in (int, float) and 0 <= raw["started"] < 1e11:
        out["started"] = float(raw["started"])
    return out


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
        self._fd: int | None = None
        self._last = 0.0
        self.started: float | None = None  # the start time written into the lock (what every rank must read back)

    def _read(self, fd: int | None = None) -> dict[str, Any]:
        """The holder named by the lock (through ``fd`` when given, else the path, links refused)."""
        try:
            if fd is None:
                fd2 = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    return parse_holder(os.pread(fd2, _MAX_LOCK_BYTES + 1, 0))
                finally:
                    os.close(fd2)
            return parse_holder(os.pread(fd, _MAX_LOCK_BYTES + 1, 0))
        except OSError:
            return {}

    def _stale(self, holder: dict[str, Any], fd: int) -> str | None:
        """Why the lock open on ``fd`` is abandoned, or None when its holder may be alive."""
        age = time.time() - os.fstat(fd).st_mtime
        if not holder:
            return "it names no holder"
        if holder.get("host") == socket.gethostname() and "pid" in holder and not _pid_alive(holder["pid"]):
            return f"process {holder['pid']} on this host is gone"
        if age > self.stale_s:
            return f"its heartbeat is {age:.0f} s old (> {self.stale_s:.0f} s)"
        return None

    def _in_use(self, holder: dict[str, Any]) -> ConfigError:
        if "started" in holder:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        else:
            since = "at an unknown time"
        return ConfigError(
            self.field, f"{self.path.parent} is in use by another run (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', 'an unknown host')}, started {since}; lock {self.path}).",
            f"wait for it to finish, choose another {self.field}, or delete the lock file if that run is dead.")

    def _open(self) -> int:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ConfigError(self.field, f"{self.path} is a symbolic link; a lock is never written through one.",
                                  f"remove that link, or choose another {self.field}.") from None
            raise ConfigError(self.field, f"cannot open the lock {self.path}: {e.strerror or e}.",
                              f"choose a writable {self.field}.") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ConfigError(self.field, f"{self.path} is not a regular file (something else sits where the lock "
                              "goes).", f"remove it, or choose another {self.field}.")
        return fd

    def _same_file(self, fd: int) -> bool:
        """Whether ``self.path`` still names the file open on ``fd`` (not removed or replaced since)."""
        try:
            a, b = os.lstat(self.path), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the run that holds it."""
        check_writable(self.path.parent, self.field)
        for _ in range(20):  # again only when the file was removed or replaced between open and flock
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd)
                os.close(fd)
                raise self._in_use(holder) from None
            except OSError as e:  # a filesystem without flock (some NFS mounts): the contents decide alone
                log.warning("%s: flock is not supported here (%s); the lock relies on its contents only",
                            self.path, e.strerror or e)
            if not self._same_file(fd):
                os.close(fd)
                continue
            holder = self._read(fd)
            if os.fstat(fd).st_size > 0:
                why = self._stale(holder, fd)
                if why is None:
                    os.close(fd)
                    raise self._in_use(holder)
                log.warning("taking over the stale lock %s (%s)", self.path, why)
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
            data = json_bytes(me)
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            self._fd = fd
            self.started = me["started"]
            self.held = True
            self._last = time.time()
            return
        raise ConfigError(self.field, f"could not take the lock {self.path} (it kept being replaced).",
                          f"choose another {self.field}.")

    def seen_started(self) -> float | None:
        """The start time in the lock file as this process reads it (None: no readable lock here)."""
        return self._read().get("started")

    def heartbeat(self) -> None:
        """Refresh the lock's modification time through the held descriptor (rate-limited); a lock
        removed or replaced under us is put back, created exclusively (never through a link)."""
        now = time.time()
        if not self.held or self._fd is None or now - self._last < self.heartbeat_s:
            return
        os.utime(self._fd)
        if not self._same_file(self._fd):
            log.warning("the lock %s was removed or replaced during the run; taking it again", self.path)
            try:
                if os.path.islink(self.path):
                    os.unlink(self.path)  # the link itself, never its target
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as e:
                log.warning("could not put the lock %s back: %s", self.path, e.strerror or e)
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    pass
                os.pwrite(fd, json_bytes({"pid": os.getpid(), "host": socket.gethostname(),
                                          "started": self.started or now}), 0)
                os.close(self._fd)
                self._fd = fd
        self._last = now

    def release(self) -> None:
        """Remove the lock if this process holds it (and the path is still our file), then let go."""
        if self.held and self._fd is not None:
            if self._same_file(self._fd) and self._read(self._fd).get("pid") == os.getpid():
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            os.close(self._fd)
            self._fd = None
        self.held = False


def json_bytes(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


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


def _fresh_folder(parent: Path, stamp: str) -> Path:
    """Create ``parent/stamp`` (or ``stamp.2``, ...) exclusively: a name already taken, by a folder, a
    file or a dangling link, is skipped, never reused or followed."""
    for tries in range(1, 1000):
        dest = parent / (stamp if tries == 1 else f"{stamp}.{tries}")
        try:
            dest.mkdir(parents=False)
            return dest
        except FileExistsError:
            continue
    raise ConfigError("checkpoint.resume", f"no free previous-<time> name in {parent}.",
                      "delete old previous-* folders there.")


def set_aside_previous_run(out_dir: str | Path, ckpt_dir: str | Path) -> Path | None:
    """Move an earlier run's files out of the way of a fresh one (``checkpoint.resume=none``), unchanged,
    into ``output_dir/previous-<UTC time>/``: its config, metrics, report, wandb folder and checkpoints
    (``checkpoints/`` there, or ``<checkpoint.dir>/previous-<UTC time>/`` when checkpoint.dir lies outside
    output_dir or on another filesystem). Nothing is deleted, relabelled or copied: every move is a rename
    on one filesystem, and when one fails the moves already made are undone, so the folder ends as it
    was (ConfigError naming the file) or fully set aside. Call with the run's locks held. Returns the
    folder, or None when there was nothing to move.
    """
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    files = [out_dir / name for name in RUN_FILES if os.path.lexists(out_dir / name)]
    steps = sorted(p for p in ckpt_dir.glob("step_*")) if ckpt_dir.is_dir() else []
    if not files and not steps:
        return None
    stamp = time.strftime("previous-%Y%m%dT%H%M%SZ", time.gmtime())
    dest = _fresh_folder(out_dir, stamp)
    ckpt_dest = None
    if steps:
        try:
            inside = ckpt_dir.resolve().relative_to(out_dir.resolve())
            same_fs = os.stat(ckpt_dir).st_dev == os.stat(out_dir).st_dev
        except ValueError:
            inside, same_fs = None, False
        if inside is not None and same_fs:
            ckpt_dest = dest / inside
            ckpt_dest.mkdir(parents=True, exist_ok=True)
        else:
            ckpt_dest = _fresh_folder(ckpt_dir, dest.name)
    moves = [(f, dest / f.name) for f in files] + [(p, ckpt_dest / p.name) for p in steps]
    done: list[tuple[Path, Path]] = []
    try:
        for src, to in moves:
            os.rename(src, to)
            done.append((src, to))
    except OSError as e:
        for src, to in reversed(done):
            os.rename(to, src)
        for folder in {ckpt_dest, dest} - {None}:
            _remove_empty_tree(folder)
        raise ConfigError("checkpoint.resume", f"could not set the earlier run in {out_dir} aside: moving {src} "
                          f"failed ({e.strerror or e}); nothing was moved.",
                          "move or delete that run's files yourself, or use another output_dir.") from None
    log.warning("checkpoint.resume=none: %s held an earlier run; its files (%s) were moved unchanged to %s%s. "
                "Delete that folder when it is not needed.", out_dir,
                ", ".join([f.name for f in files] + ([f"{len(steps)} checkpoint(s)"] if steps else [])), dest,
                f" and {ckpt_dest}" if steps and not str(ckpt_dest).startswith(str(dest)) else "")
    return dest


def _remove_empty_tree(folder: Path) -> None:
    """Remove ``folder`` and the empty folders under it (what an undone set-aside created)."""
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
        try:
            sub.rmdir()
        except OSError:
            pass
    try:
        folder.rmdir()
    except OSError:
        pass
