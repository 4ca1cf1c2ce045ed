"""Shared fixtures: fixed seeds and a CPU subprocess environment."""

from __future__ import annotations

import os

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


@pytest.fixture
def env_cpu() -> dict[str, str]:
    """Environment for subprocess training runs: CPU, wandb off, one thread per process."""
    env = dict(os.environ)
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    return env
