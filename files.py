"""Reading and writing files in folders that other users or processes may also write.

Every file longshard creates or replaces in such a folder goes through :func:`write_file` (or
:func:`append_text`, :func:`probe_writable`): it is created under a random name with
``O_CREAT | O_EXCL | O_NOFOLLOW`` (so a link planted at that name is refused, never followed), given
its mode with ``fchmod`` on our own descriptor, then renamed over the target (``rename`` replaces a
link at the target itself; it never writes through it). Nothing here calls ``chmod`` on a path.

Every JSON document we read goes through :func:`load_json` / :func:`read_json`: a size cap and a
nesting-depth cap checked before parsing, so a hostile file is a named error, never a
``RecursionError`` or an out-of-memory kill.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 256 * 2**20  # larger than any state, index or config file we write
MAX_JSON_DEPTH = 64  # ours nest at most 6 deep; HF configs about 4
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BRACKETS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.S)


class UnsafeFileError(OSError):
    """A path we were about to write or read is a link, not a regular file, or not ours."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(bits: int = 0o666) -> int:
    """``bits`` less the process umask (default: the mode ``open(..., 'w')`` gives a new file)."""
    return bits & ~_umask()


def json_depth(data: bytes | str, limit: int = MAX_JSON_DEPTH) -> int:
    """Nesting depth of a JSON text (brackets outside strings), stopping as soon as it passes ``limit``.
    Linear in the text; never recursive."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    depth = deepest = 0
    for m in _BRACKETS.finditer(raw):
        c = m.group()
        if c in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif c in (b"]", b"}"):
            depth -= 1
    return deepest


def load_json(data: bytes | str, max_depth: int = MAX_JSON_DEPTH, max_bytes: int = MAX_JSON_BYTES,
              **kwargs: Any) -> Any:
    """``json.loads`` with a size and nesting-depth bound (raises ValueError saying which)."""
    if len(data) > max_bytes:
        raise ValueError(f"{len(data)} bytes, more than the {max_bytes} accepted")
    if json_depth(data, max_depth) > max_depth:
        raise ValueError(f"nested more than {max_depth} levels deep")
    try:
        return json.loads(data, **kwargs)
    except RecursionError:  # belt and braces: the depth check above should make this unreachable
        raise ValueError(f"nested too deeply to parse (limit {max_depth})") from None


def read_regular(path: str | Path, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file (not a link, a FIFO or a device), at most ``max_bytes``
    (raises UnsafeFileError / ValueError / OSError)."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise ValueError(f"{st.st_size} bytes, more than the {max_bytes} accepted")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ValueError(f"more than the {max_bytes} bytes accepted")
        return data
    finally:
        os.close(fd)


def read_json(path: str | Path, max_depth: int = MAX_JSON_DEPTH, max_bytes: int = MAX_JSON_BYTES,
              follow_links: bool = True) -> Any:
    """Parse the JSON file ``path`` with :func:`load_json`'s bounds. ``follow_links=False`` refuses a
    link at ``path`` (files of our own run folders); a link to a file is read for inputs a user names.
    Raises OSError, UnsafeFileError or ValueError (JSON errors included)."""
    path = Path(path)
    if follow_links:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    else:
        data = read_regular(path, max_bytes)
    if len(data) > max_bytes:
        raise ValueError(f"more than the {max_bytes} bytes accepted")
    return load_json(data, max_depth, max_bytes)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name[:120]}.{secrets.token_hex(8)}.tmp")


def create_exclusive(path: str | Path, mode: int | None = None) -> int:
    """A new file at ``path`` opened for writing (``O_EXCL | O_NOFOLLOW``: fails on anything there,
    a link included), mode set on the descriptor. Returns the descriptor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
    try:
        os.fchmod(fd, default_mode() if mode is None else mode)
    except OSError:
        os.close(fd)
        raise
    return fd


def write_file(path: str | Path, data: bytes | str, mode: int | None = None, fsync: bool = False) -> Path:
    """Create or replace ``path`` with ``data``, atomically, never through a link: written to a fresh
    random name beside it (``O_EXCL | O_NOFOLLOW``), mode set with ``fchmod`` (default: what the umask
    gives a new file), then renamed over ``path`` (a link there is replaced, its target untouched).

    Args:
        path: the file to write; its folder must exist.
        data: bytes, or text written as UTF-8.
        mode: permission bits (default 0o666 less the umask).
        fsync: flush to disk before the rename.
    """
    path = Path(path)
    tmp = _temp_name(path)
    fd = create_exclusive(tmp, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def fresh_dir(parent: str | Path, prefix: str) -> Path:
    """A new folder under ``parent`` with a random name (created exclusively: never an existing folder
    or a link), given the mode a plain ``mkdir`` would (on its own descriptor)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC)
    try:
        os.fchmod(fd, default_mode(0o777))
    finally:
        os.close(fd)
    return path


def copy_file(src: str | Path, dst: str | Path, max_bytes: int = 2**31) -> Path:
    """Copy the regular file ``src`` (a link to one is read) to ``dst`` with :func:`write_file`."""
    with open(src, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise UnsafeFileError(f"{src} is not a regular file")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{src} is larger than {max_bytes} bytes")
    return write_file(dst, data)


def open_append(path: str | Path) -> int:
    """A descriptor appending to the regular file ``path`` (created if missing), never through a link:
    ``O_NOFOLLOW`` refuses one, and anything else there (a FIFO, a device) is refused too."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0),
                 default_mode())
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFileError(f"{path} is not a regular file")
    return fd


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` with :func:`open_append` (one write call)."""
    fd = open_append(path)
    try:
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def set_mode(path: str | Path, mode: int) -> None:
    """``fchmod`` a regular file we own, opened with ``O_NOFOLLOW``: a link, or another user's file,
    is left alone (raises UnsafeFileError)."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise UnsafeFileError(f"{path} is not a regular file of ours; its mode was left alone")
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def probe_writable(folder: str | Path) -> None:
    """Prove a file can be created in ``folder`` (a random name, created exclusively, then removed);
    raises OSError as the filesystem does. Never touches an existing file."""
    name = Path(folder) / f".write-test-{secrets.token_hex(8)}"
    os.close(create_exclusive(name))
    os.unlink(name)


def check_path_names(path: str | Path, field: str) -> None:
    """Raise ConfigError naming ``field`` when a component of ``path`` is longer than the filesystem
    allows (255 bytes on Linux filesystems) or the whole path longer than PATH_MAX: the OS would
    refuse it later with a raw ``File name too long``."""
    from longshard.errors import ConfigError

    raw = os.fsencode(str(path))
    longest = max((len(part) for part in raw.split(b"/")), default=0)
    if longest > 255 or len(raw) >= 4096:
        raise ConfigError(field, f"the path {str(path)[:80]}... has a name of {longest} bytes (at most 255 per "
                          f"name and 4095 in all: {len(raw)}).", "give a shorter path.")


def is_regular_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is a regular file (not a link) lying inside ``folder`` (no link on the way)."""
    try:
        rel = path.relative_to(folder)
    except ValueError:
        return False
    here = folder
    for part in rel.parts[:-1]:
        here = here / part
        if not stat.S_ISDIR(os.lstat(here).st_mode):
            return False
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
