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


def _run(cmd: list[str], out, env: dict, cwd) -> dict:
    """Run the example; its losses.json."""
    proc = subprocess.run([*cmd, "--output", str(out)], env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "losses.json").read_text())


def _same_losses(ref: dict, got: dict) -> None:
    assert got["world"] == 2 and got["sp"] == 2 and len(got["losses"]) == len(ref["losses"]) == 8
    assert max(abs(a - b) / abs(a) for a, b in zip(ref["losses"], got["losses"])) < 1e-5, (ref, got)


@pytest.mark.parametrize("mode", ["ring", pytest.param("ulysses", marks=pytest.mark.slow)])
def test_trainer_with_sequence_parallel_2_trains_the_losses_of_one_process(tmp_path, env_cpu, mode):
    ref = _run([sys.executable, SCRIPT, "--sp", "1"], tmp_path / "sp1", env_cpu, tmp_path)
    got = _run(torchrun_cmd(2, SCRIPT, "--sp", "2", "--mode", mode), tmp_path / "sp2", env_cpu, tmp_path)
    _same_losses(ref, got)


@pytest.mark.slow  # default suite under ~15 min on 2 cores: the Trainer under torchrun with sequence
# parallel 2 stays in it (test_trainer_with_sequence_parallel_2_trains_the_losses_of_one_process[ring]) (23 s)
def test_trainer_accumulating_under_accelerate_launch_trains_the_losses_of_one_big_batch(tmp_path, env_cpu):
    """`accelerate launch` (2 processes; CPU over gloo) of the example with sequence parallel 2 and 2 micro-batches
    of 2 sequences per step trains the losses of one process taking the same 4 sequences in one micro-batch:
    each micro-batch's loss is its share of the step's token mean (fp32 regrouping, ~1e-7; 1e-5 catches a
    micro-batch normalised by its own tokens or divided by the accumulation twice)."""
    import shutil

    from helpers import free_port

    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate command is not installed")
    ref = _run([sys.executable, SCRIPT, "--sp", "1", "--batch", "4"], tmp_path / "big", env_cpu, tmp_path)
    got = _run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                SCRIPT, "--sp", "2", "--batch", "2", "--grad-accum", "2"], tmp_path / "acc", env_cpu, tmp_path)
    _same_losses(ref, got)
