"""The time a clean stop needs against the time Slurm gives it: the save time each checkpoint records,
the signal lead ``launch slurm`` sizes from it, KillWait read from ``scontrol``, and the warnings."""

from __future__ import annotations

import os

import pytest
from longshard.launch.stop_budget import (
    DEFAULT_LEAD_S,
    budget_warnings,
    measured_save_s,
    signal_lead_for,
    slurm_budget_warnings,
    slurm_kill_wait,
)


def test_leads_and_warnings():
    assert signal_lead_for(None) == DEFAULT_LEAD_S == 120
    assert signal_lead_for(10.0) == 120 and signal_lead_for(100.2) == 261
    assert budget_warnings(5.0, 120, 30) == []
    slow = budget_warnings(200.0, 120, 30)
    assert len(slow) == 2 and "more than the 120 s of warning" in slow[0] and "--signal-lead" in slow[0]
    assert "KillWait of 30 s" in slow[1] and "checkpoint.every" in slow[1]
    assert budget_warnings(45.0, None, 30) == [budget_warnings(45.0, 120, 30)[0]]


def test_kill_wait_is_read_from_scontrol_and_the_run_warns_on_slurm(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 'JobAcctGatherType = jobacct_gather/none'\n"
                                      "echo 'KillWait                = 30 sec'\n")
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    assert slurm_kill_wait() == 30
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert slurm_budget_warnings(500.0) == []  # off Slurm: nothing to compare with
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("LONGSHARD_SIGNAL_LEAD_S", "600")
    warnings = slurm_budget_warnings(40.0)
    assert len(warnings) == 1 and "KillWait of 30 s" in warnings[0]
    assert slurm_budget_warnings(None) == []


def test_checkpoints_record_their_save_time_and_launch_slurm_sizes_the_lead_from_it(tmp_path, caplog, capsys):
    from longshard.cli import main
    from longshard.train.checkpoint import read_trainer_state

    caplog.set_level("INFO", logger="longshard")
    out = tmp_path / "r"
    base = ["tiny_lm", "train.nproc=1", "train.steps=1", "checkpoint.every=1", "train.global_batch_size=4",
            "data.default_corpus_bytes=100000", "eval.passkey_samples=0", "eval.val_batches=1",
            "logging.wandb=disabled", f"output_dir={out}"]
    slurm = ["launch", "slurm", *base, "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", "1", "--dry-run"]
    assert main(slurm) == 0
    assert "#SBATCH --signal=B:USR1@120\n" in capsys.readouterr().out and "no checkpoint measured yet" in caplog.text
    assert main(["train", *base, "--dry-run"]) == 0
    assert "fresh start (no checkpoint to resume)" in capsys.readouterr().out
    assert main(["train", *base]) == 0
    capsys.readouterr()
    assert main(["train", *base, "train.steps=2", "--dry-run"]) == 0  # says what it would resume
    assert f"resumes from {out / 'checkpoints' / 'step_00000001'} (step 1)" in capsys.readouterr().out
    save_s = read_trainer_state(out / "checkpoints" / "step_00000001")["save_s"]
    assert 0 < save_s < 120 and measured_save_s(out / "checkpoints") == save_s
    caplog.clear()
    assert main(slurm) == 0
    text = capsys.readouterr().out
    assert f"#SBATCH --signal=B:USR1@{signal_lead_for(save_s)}\n" in text
    assert f"export LONGSHARD_SIGNAL_LEAD_S={signal_lead_for(save_s)}" in text
    assert "save measured in" in caplog.text
    assert main([*slurm, "--signal-lead", "900"]) == 0 and "USR1@900\n" in capsys.readouterr().out
    with pytest.raises(Exception, match="signal-lead"):
        from longshard.launch.slurm import render_sbatch

        render_sbatch("tiny_lm", nodes=1, gpus_per_node=1, signal_lead=5)
