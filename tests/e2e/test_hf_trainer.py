"""launch/hf_trainer_sp.py: transformers.Trainer training a transformers Qwen2 (14/2 heads) with longshard's
attention under sequence parallelism 2 (ring: zigzag + ring attention; Ulysses) trains the same losses as
on one process without it (every step's loss, fp32: the sharded sums regroup, ~1e-7)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, torchrun_cmd

pytestmark = pytest.mark.dist
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
SCRIPT = str(REPO / "launch" / "hf_trainer_sp.py")


@pytest.mark.parametrize("mode", ["ring", pytest.param("ulysses", marks=pytest.mark.slow)])
def test_trainer_with_sequence_parallel_2_trains_the_losses_of_one_process(tmp_path, env_cpu, mode):
    one = subprocess.run([sys.executable, SCRIPT, "--sp", "1", "--output", str(tmp_path / "sp1")], env=env_cpu,
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(torchrun_cmd(2, SCRIPT, "--sp", "2", "--mode", mode, "--output", str(tmp_path / "sp2")),
                         env=env_cpu, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    ref = json.loads((tmp_path / "sp1" / "losses.json").read_text())["losses"]
    got = json.loads((tmp_path / "sp2" / "losses.json").read_text())
    assert got["world"] == 2 and got["sp"] == 2 and len(got["losses"]) == len(ref) == 8
    assert max(abs(a - b) / abs(a) for a, b in zip(ref, got["losses"])) < 1e-5, (ref, got["losses"])
