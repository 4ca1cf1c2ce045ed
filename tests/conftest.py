"""Shared fixtures: fixed seeds and a CPU subprocess environment."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton decides interpreted vs compiled when a kernel is defined: set this before longshard's
    # kernel modules are imported so the Triton tests run on CPU. Our dispatch only picks Triton
    # kernels for CUDA tensors, so the other tests are unaffected.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The embedded corpus prepared once per test module (300K tokens)."""
    from longshard.train.data import prepare_default

    path = tmp_path_factory.mktemp("data") / "default"
    prepare_default(path, 300_000)
    return path


@pytest.fixture
def env_cpu() -> dict[str, str]:
    """Environment for subprocess training runs: CPU, wandb off, one thread per process."""
    env = dict(os.environ)
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    return env


@pytest.fixture
def small_disk(tmp_path):
    """``make(size, read_only=False)`` -> a folder on a tmpfs of that size (root and mount needed)."""
    mounted = []

    def make(size: str, read_only: bool = False) -> Path:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:200]})")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
