"""A used output_dir: a different model is one named error (dry run and real run alike); with
checkpoint.resume=none the earlier run is set aside unchanged and the new run starts clean. An
output_dir that is not the same folder on every node is named before any work."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

pytestmark = pytest.mark.dist

SMALL = ["train.nproc=1", "parallel.sp_degree=1", "train.steps=4", "checkpoint.every=2", "data.mqar_curriculum=[]",
         "eval.mqar_samples=4", "eval.val_batches=1", "optim.warmup_steps=1", "train.log_every=1",
         "logging.progress=false", "logging.wandb=disabled"]


def _train(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longshard.cli", "train", "quickstart", *SMALL, *args], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_different_model_in_a_used_output_dir(tmp_path, env_cpu):
    first = _train("output_dir=runs/q", env=env_cpu, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "runs" / "q"
    before = _digest(out)
    fix = ("Fix: resume with the checkpoint's model settings; or train this model in a new output_dir; or add "
           "checkpoint.resume=none to start afresh here")
    for extra in (["--dry-run"], []):  # the dry run checks what the run checks; neither touches the folder
        proc = _train("output_dir=runs/q", "model.dim=192", *extra, env=env_cpu, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "model: the checkpoint runs/q/checkpoints/step_00000004 was trained with a different model " \
               "(model.dim: checkpoint 128, now 192" in proc.stderr and fix in proc.stderr
        assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
        assert _digest(out) == before

    fresh = _train("output_dir=runs/q", "model.dim=192", "checkpoint.resume=none", env=env_cpu, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    aside = sorted(out.glob("previous-*"))
    assert len(aside) == 1 and f"were moved unchanged to {aside[0].relative_to(tmp_path)}" in fresh.stderr
    assert _digest(aside[0]) == {k: v for k, v in before.items() if not k.startswith(".lock")}  # byte for byte
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]  # the new run's steps only, once
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_step"] == 0
    assert "dim: 192" in (out / "config.yaml").read_text()
    # and it resumes as its own run afterwards (the set-aside checkpoints are not candidates)
    again = _train("output_dir=runs/q", "model.dim=192", "train.steps=6", env=env_cpu, cwd=tmp_path)
    assert again.returncode == 0 and "resumed from step 4" in again.stderr, again.stderr[-3000:]


def test_an_output_dir_that_differs_between_nodes_is_named(tmp_path, env_cpu):
    """Two torchrun "nodes" on this machine, each started in its own folder with a relative output_dir:
    what nodes without a shared filesystem see. Both stop before the first step, naming the field."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
               f"--node-rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "-m", "longshard.train.main", "quickstart", *SMALL[1:], "parallel.sp_degree=2", "output_dir=runs/q"]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env_cpu, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode != 0 for p in procs), outs
    message = "output_dir: runs/q is not the same folder on every node"
    assert message in outs[0] + outs[1], outs[0][-3000:] + outs[1][-3000:]
    assert "does not see rank 0's lock .lock" in outs[1], outs[1][-3000:]
    assert not (tmp_path / "node1" / "runs" / "q" / "metrics.jsonl").exists()
    assert not (tmp_path / "node0" / "runs" / "q" / "checkpoints").exists() or \
        not any((tmp_path / "node0" / "runs" / "q" / "checkpoints").iterdir())


def test_the_final_checkpoint_is_recognised_by_its_step_not_a_name_suffix():
    """The loop writes a final checkpoint unless the last one holds step train.steps; a resumed-from folder
    whose name merely ends in those digits (e.g. a copy named best-00000300) is not that checkpoint."""
    from longshard.train.checkpoint import checkpoint_step

    assert checkpoint_step("runs/q/checkpoints/step_00000300") == 300
    assert checkpoint_step(Path("/x/best-00000300")) is None
    assert checkpoint_step("runs/q/checkpoints/step_00000300.tmp") is None
