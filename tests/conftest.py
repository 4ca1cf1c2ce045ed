"""Shared fixtures: fixed seeds and a CPU subprocess environment."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def env_cpu() -> dict[str, str]:
    """Environment for subprocess training runs: CPU, wandb off, one thread per process."""
    env = dict(os.environ)
    env.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    return env
