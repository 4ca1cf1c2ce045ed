"""Fixtures of the training tests."""

from __future__ import annotations

import pytest
from attack_helpers import SMALL_RUN


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A 1-process tiny_lm of 2 steps with a checkpoint at each (run in this process)."""
    from longshard.cli import main

    out = tmp_path_factory.mktemp("sec") / "run"
    rc = main(["train", *SMALL_RUN, "train.steps=2", "checkpoint.every=1", f"output_dir={out}"])
    assert rc == 0
    return out
