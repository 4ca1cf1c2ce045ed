"""``train.nan_policy=skip``: skipped updates are counted, and a run that ends while skipping is not a
clean finish."""

from __future__ import annotations

import json

BASE = ["train", "tiny_lm", "train.nproc=1", "train.steps=5", "train.global_batch_size=4",
        "data.default_corpus_bytes=100000", "eval.passkey_samples=0", "eval.val_batches=1", "logging.wandb=disabled",
        "train.nan_policy=skip", "optim.warmup_steps=0"]


def _nan_at(monkeypatch, steps: set[int]) -> None:
    """Make the loss of the given optimizer steps NaN (one micro-batch per step here: accumulation 1)."""
    import longshard.train.loop as loop

    real, calls = loop.forward_loss, [0]

    def forward(*args, **kwargs):
        calls[0] += 1
        out = real(*args, **kwargs)
        if calls[0] in steps:
            out = out._replace(loss_sum=out.loss_sum * float("nan"))
        return out

    monkeypatch.setattr(loop, "forward_loss", forward)


def test_a_transient_nan_is_skipped_and_counted(tmp_path, monkeypatch, caplog):
    import logging

    from longshard.cli import main

    caplog.set_level(logging.INFO)
    _nan_at(monkeypatch, {3})
    out = tmp_path / "run"
    assert main([*BASE, f"output_dir={out}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_steps"] == 1 and report["skipped_at"] == [3] and len(report["losses"]) == 4
    assert "finished: 5 steps, 1 update(s) skipped (non-finite; steps [3])" in caplog.text


def test_a_run_that_ends_while_skipping_is_not_a_clean_finish(tmp_path, monkeypatch, caplog):
    from longshard.cli import main
    from longshard.errors import EXIT_CHECKPOINT

    _nan_at(monkeypatch, {2, 3, 4, 5})
    out = tmp_path / "run"
    assert main([*BASE, "checkpoint.every=1", f"output_dir={out}"]) == EXIT_CHECKPOINT
    assert "the run ended while skipping updates: steps 2-5 (4 in a row, 4 in all) left the weights unchanged, so " \
           "they are those of step 1; no final checkpoint was written" in caplog.text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]  # never relabelled
    assert not (out / "report.json").exists()


def test_the_summary_without_skips_is_unchanged():
    from longshard.train.metrics import human_summary

    report = {"name": "q", "steps": 3, "losses": [3.0, 2.0, 1.0], "resumed_from_step": 0, "world_size": 1,
              "sp_degree": 1, "tp_degree": 1, "device": "cpu", "wall_s": 1.0, "metrics_file": "/x/metrics.jsonl",
              "skipped_steps": 0, "skipped_at": []}
    text = human_summary(report)
    assert text.startswith("q finished: 3 steps in 1.0 s") and "training loss 3 (step 1) -> 1 (step 3)" in text
