"""Checkpoints and resume: a killed run resumes exactly, damaged or half-written checkpoints are skipped,
ranks agree on what they load, and a different run or fewer steps are refused."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
from helpers import torchrun_cmd
from longshard.train.data import prepare_default
from train_runs import TINY, _kill_all, _losses, _run

pytestmark = pytest.mark.dist


def test_kill_and_resume_is_exact(tmp_path, data_dir, env_cpu):
    """6 steps straight == 3 steps, SIGKILL, resume 3 (losses bit-identical on CPU fp32)."""
    extra = ["train.steps=6", "checkpoint.every=3", "parallel.dp_mode=ddp"]
    _run(2, tmp_path / "straight", data_dir, extra, env_cpu)
    straight = _losses(tmp_path / "straight")

    out = tmp_path / "killed"
    args = ["tiny_lm", *TINY, "data.source=prepared", f"data.path={data_dir}", f"output_dir={out}", *extra]
    proc = subprocess.Popen(torchrun_cmd(2, "-m", "longshard.train.main", *args), env=env_cpu,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt3 = out / "checkpoints" / "step_00000003"
    deadline = time.time() + 240
    while not ckpt3.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    _kill_all(f"output_dir={out}")
    proc.wait()
    assert ckpt3.exists(), "the run died before writing its step-3 checkpoint"
    # whatever got further than step 3 is discarded, so the resume provably starts at step 3
    for p in (out / "checkpoints").iterdir():
        if p.name != ckpt3.name:
            subprocess.run(["rm", "-rf", str(p)], check=True)
    (out / "report.json").unlink(missing_ok=True)

    _run(2, out, data_dir, [*extra, "checkpoint.resume=auto"], env_cpu)
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_step"] == 3
    assert report["losses"] == straight


def test_killed_rank_then_resume_is_exact(tmp_path, data_dir, env_cpu):
    """Rank 1 SIGKILLs itself at the start of step 4 (drill hook): rank 0 reports the failed collective
    and the job fails; a second launch with resume=auto continues from the step-3 checkpoint and its
    losses equal an uninterrupted run bit for bit."""
    extra = ["train.steps=6", "checkpoint.every=3", "parallel.dp_mode=ddp", "checkpoint.resume=auto"]
    _run(2, tmp_path / "straight", data_dir, extra, env_cpu)
    out = tmp_path / "drill"
    env = dict(env_cpu, LONGSHARD_INJECT_FAULT="kill:rank=1:step=4")
    proc = _run(2, out, data_dir, extra, env, check=False)
    assert proc.returncode != 0
    assert "fault drill: kill on rank 1 at step 4" in proc.stderr
    # rank 0 was blocked in a collective when its peer died: it says where instead of hanging
    assert re.search(r"rank 0: a collective failed during the training step of step 4", proc.stderr), \
        proc.stderr[-4000:]
    assert not (out / "report.json").exists()
    _run(2, out, data_dir, extra, env_cpu)
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_step"] == 3
    assert report["losses"] == _losses(tmp_path / "straight")


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, data_dir, env_cpu):
    """A truncated shard in the newest checkpoint is named and skipped; resume takes the previous one.
    When no checkpoint loads, the run stops with an error instead of silently starting over."""
    out = tmp_path / "r"
    _run(1, out, data_dir, ["train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=5"], env_cpu)
    ckpts = out / "checkpoints"
    shard = next((ckpts / "step_00000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    proc = _run(1, out, data_dir, ["train.steps=5", "checkpoint.every=0"], env_cpu)
    assert f"{shard} is truncated or altered" in proc.stderr, proc.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["resumed_from_step"] == 2

    for ck in ckpts.glob("step_*"):
        (ck / "trainer_state.json").write_text("{not json")
    proc = _run(1, out, data_dir, ["train.steps=6"], env_cpu, check=False)
    assert proc.returncode == 3
    assert "no checkpoint under" in proc.stderr and "trainer_state.json is corrupt" in proc.stderr


def test_ranks_agree_on_the_checkpoint_they_load(tmp_path, data_dir, env_cpu):
    """2 ranks. Same-size garbage in rank 1's own file of the newest checkpoint: both ranks fall back to
    the previous checkpoint together (before: rank 1 alone fell back and the ranks hung). A flipped
    byte in a shard (same size) is caught by its checksum, and DCP's own error type (a BaseException)
    is a fallback too, never a crash."""
    out = tmp_path / "r"
    _run(2, out, data_dir, ["train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=5"], env_cpu)
    ckpts = out / "checkpoints"
    extra = ckpts / "step_00000006" / "rank_1.pt"
    extra.write_bytes(b"\0" * extra.stat().st_size)
    shard = next((ckpts / "step_00000004").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = _run(2, out, data_dir, ["train.steps=7", "checkpoint.every=0"], env_cpu, timeout=240)
    assert json.loads((out / "report.json").read_text())["resumed_from_step"] == 2, proc.stderr[-3000:]
    assert "another rank found its part damaged" in proc.stderr or "rank_1.pt is corrupt" in proc.stderr
    assert f"{shard} is corrupt: its checksum differs" in proc.stderr, proc.stderr[-3000:]


def test_dcp_error_falls_back(tmp_path, data_dir, env_cpu):
    """A checkpoint whose DCP read fails with CheckpointException (derives from BaseException): skipped."""
    out = tmp_path / "r"
    _run(1, out, data_dir, ["train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=5"], env_cpu)
    newest = out / "checkpoints" / "step_00000004"
    state = json.loads((newest / "trainer_state.json").read_text())
    for shard in newest.glob("*.distcp"):  # cut short on disk, gone from the manifest: DCP itself fails
        shard.write_bytes(b"\0" * 10)
        state["files"].pop(shard.name)
    (newest / "trainer_state.json").write_text(json.dumps(state))
    proc = _run(1, out, data_dir, ["train.steps=5", "checkpoint.every=0"], env_cpu)
    assert "failed to read DCP checkpoint" in proc.stderr, proc.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["resumed_from_step"] == 2


def test_step_folder_without_state_is_never_overwritten(tmp_path, data_dir, env_cpu):
    """A step folder without trainer_state.json is skipped on resume and, when that step is saved
    again, moved aside instead of deleted."""
    out = tmp_path / "r"
    _run(1, out, data_dir, ["train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=5"], env_cpu)
    newest = out / "checkpoints" / "step_00000004"
    (newest / "trainer_state.json").unlink()
    (newest / "keep_me.txt").write_text("user data")
    _run(1, out, data_dir, ["train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=5"], env_cpu)
    assert json.loads((out / "report.json").read_text())["resumed_from_step"] == 2
    aside = list((out / "checkpoints").glob("step_00000004.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "keep_me.txt").read_text() == "user data"
    assert (newest / "trainer_state.json").is_file()  # the new step-4 checkpoint


def test_half_written_checkpoint_is_ignored(tmp_path, data_dir, env_cpu):
    extra = ["train.steps=2", "checkpoint.every=1", "checkpoint.keep_last=5"]
    _run(1, tmp_path / "r", data_dir, extra, env_cpu)
    ckpts = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000001", "step_00000002"]
    # a crash during writing leaves a .tmp folder: it must not be picked up
    (ckpts / "step_00000009.tmp").mkdir()
    _run(1, tmp_path / "r", data_dir, ["train.steps=3", "checkpoint.every=1", "checkpoint.keep_last=2"], env_cpu)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["resumed_from_step"] == 2 and len(report["losses"]) == 3
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.endswith(".tmp")) == [
        "step_00000002", "step_00000003"]  # keep_last=2 pruned the oldest


def test_resume_refuses_a_different_run_and_applies_allowed_changes(tmp_path, data_dir, env_cpu):
    """A 4-layer checkpoint: resuming with 2 layers is refused naming the field (and nothing is pruned);
    a changed lr, seq_len or corpus is refused unless listed in checkpoint.allow_changes; an allowed
    lr reaches the optimizer (the logged lr follows the new value)."""

    out = tmp_path / "r"
    base = ["train.steps=2", "checkpoint.every=1", "checkpoint.keep_last=1", "train.log_every=1",
            "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=1e-3"]
    _run(1, out, data_dir, [*base, "model.n_layers=4"], env_cpu)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = _run(1, out, data_dir, [*base, "train.steps=3", "model.n_layers=2"], env_cpu, check=False)
    assert proc.returncode == 2 and "model.n_layers: checkpoint 4, now 2" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before

    four = [*base, "model.n_layers=4", "train.steps=3"]
    proc = _run(1, out, data_dir, [*four, "optim.lr=5e-4"], env_cpu, check=False)
    assert proc.returncode == 2 and "optim.lr: checkpoint 0.001, now 0.0005" in proc.stderr, proc.stderr[-2000:]
    assert "checkpoint.allow_changes=[optim.lr]" in proc.stderr
    proc = _run(1, out, data_dir, [*four, "train.seq_len=32"], env_cpu, check=False)
    assert proc.returncode == 2 and "train.seq_len: checkpoint 64, now 32" in proc.stderr
    other = tmp_path / "other_data"
    prepare_default(other, 200_000)
    proc = _run(1, out, other, four, env_cpu, check=False)
    assert proc.returncode == 2 and "data.path: checkpoint" in proc.stderr, proc.stderr[-2000:]

    _run(1, out, data_dir, [*four, "optim.lr=5e-4", "checkpoint.allow_changes=[optim.lr]"], env_cpu)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lrs[1] == pytest.approx(1e-3) and lrs[3] == pytest.approx(5e-4), lrs


def test_rerun_with_fewer_steps_is_refused_and_the_run_is_kept(tmp_path, data_dir, env_cpu):
    """Friction 2: after a 4-step run, `train.steps=2` into the same folder used to resume at 4, train
    nothing, save the step-4 weights as step 2 and write a 2-step report; now it stops naming the fix
    and leaves checkpoints and report as they were."""
    out = tmp_path / "r"
    _run(1, out, data_dir, ["train.steps=4", "checkpoint.every=2", "checkpoint.keep_last=1"], env_cpu)
    before = (out / "report.json").read_text()
    proc = _run(1, out, data_dir, ["train.steps=2", "checkpoint.every=2", "checkpoint.keep_last=1",
                                   "checkpoint.resume=auto"], env_cpu, check=False)
    assert proc.returncode == 2
    assert "train.steps: " in proc.stderr and "is step 4, beyond train.steps=2" in proc.stderr, proc.stderr[-2000:]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000004"]
    assert (out / "report.json").read_text() == before

