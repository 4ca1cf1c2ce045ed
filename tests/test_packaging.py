"""Packaging: a non-editable install must contain every subpackage of the repository."""

from __future__ import annotations

import pytest
from helpers import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"longshard"}
    for init in REPO.rglob("__init__.py"):
        rel = init.parent.relative_to(REPO)
        if rel.parts and rel.parts[0] in {"tests", "build", "benchmarks"} or any(p.startswith(".") for p in rel.parts):
            continue
        if rel.parts:
            found.add("longshard." + ".".join(rel.parts))
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"
