"""Packaging: the package list setup.py gives the build holds every subpackage of the repository under
the longshard name (checked on setup.py's discovery; no wheel is built here), and importing longshard
or building the default recipe's model needs no network."""

from __future__ import annotations

import pytest
from helpers import REPO

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def test_every_package_is_installed():
    """The build discovers packages itself (setup.py): every folder with an __init__.py is installed
    under the longshard name, and nothing else is."""
    import subprocess
    import sys

    assert "packages" not in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    out = subprocess.run([sys.executable, "-c", "import setup; print(' '.join(setup.discovered_packages()))"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    found = {"longshard"}
    for init in REPO.rglob("__init__.py"):
        rel = init.parent.relative_to(REPO)
        if rel.parts and rel.parts[0] in {"tests", "build", "benchmarks"} or any(p.startswith(".") for p in rel.parts):
            continue
        if rel.parts:
            found.add("longshard." + ".".join(rel.parts))
    assert set(out) == found, f"missing: {sorted(found - set(out))}; extra: {sorted(set(out) - found)}"


def test_no_network_at_import_or_when_building_the_default_recipe():
    """Every module imports and the quickstart config and model build with sockets disabled."""
    import subprocess
    import sys

    code = (
        "import socket\n"
        "def _no(*a, **k):\n"
        "    raise RuntimeError('network access attempted')\n"
        "socket.socket.connect = _no\n"
        "socket.create_connection = _no\n"
        "socket.getaddrinfo = _no\n"
        "import importlib, pkgutil, longshard\n"
        "for m in pkgutil.walk_packages(longshard.__path__, 'longshard.'):\n"
        "    if m.name.split('.')[1] not in ('tests', 'benchmarks', 'build'):\n"
        "        importlib.import_module(m.name)\n"
        "from longshard.train.config import load_config\n"
        "from longshard.train.resolve import resolve_model_config\n"
        "from longshard.models import Transformer\n"
        "cfg = load_config('quickstart', [])\n"
        "Transformer(resolve_model_config(cfg))\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "WANDB_MODE": "offline"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
