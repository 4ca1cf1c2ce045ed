"""The embedded default corpus: the Python standard library's own source files.

Real, varied text that is present on every machine that can run longshard, so the quickstart
needs no download. Files are read in sorted order, so the corpus is deterministic for a given
Python version.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__", "lib2to3", "turtledemo"}


def stdlib_root() -> Path:
    """Folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_documents(max_bytes: int) -> Iterator[str]:
    """Yield stdlib source files as documents until ``max_bytes`` bytes were yielded.

    Args:
        max_bytes: total UTF-8 bytes to produce (the last document is cut to fit).
    """
    total = 0
    root = stdlib_root()
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        data = text.encode("utf-8")
        if total + len(data) > max_bytes:
            text = data[: max_bytes - total].decode("utf-8", errors="ignore")
        yield text
        total += len(text.encode("utf-8"))
        if total >= max_bytes:
            return
