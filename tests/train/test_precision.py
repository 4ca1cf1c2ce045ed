"""One compute dtype per run (``longshard.train.precision``): the trainer, ``longshard eval`` and the
planner read ``train.dtype`` the same way, fp16 included."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from longshard.train.config import load_config
from longshard.train.plan import Layout, estimate
from longshard.train.precision import activation_bytes, compute_dtype
from longshard.train.resolve import resolve_model_config


def test_every_dtype_maps_once():
    assert [compute_dtype(d) for d in ("fp32", "bf16", "fp16")] == [None, torch.bfloat16, torch.float16]
    assert [activation_bytes(d) for d in ("fp32", "bf16", "fp16")] == [4, 2, 2]


def test_the_planner_counts_fp16_activations_at_two_bytes():
    layout = Layout(1, 1, "ulysses", "ddp", "none", "none")
    acts = {}
    for dtype in ("fp32", "bf16", "fp16"):
        cfg = load_config("tiny_lm", [f"train.dtype={dtype}"])
        acts[dtype] = estimate(cfg, resolve_model_config(cfg), layout, 1).activations
    assert acts["fp16"] == acts["bf16"] < acts["fp32"], acts


@pytest.mark.dist
def test_eval_of_an_fp16_run_evaluates_in_fp16(tmp_path, env_cpu):
    """`longshard eval` of a checkpoint reproduces the trainer's final held-out loss: same weights, same
    windows, same autocast dtype."""
    out = tmp_path / "run"
    common = ["train.dtype=fp16", "train.nproc=1", "train.steps=2", "model.n_layers=1", "train.seq_len=64",
              "train.global_batch_size=4", "data.default_corpus_bytes=100000", "eval.passkey_samples=0",
              "eval.val_batches=2", "logging.wandb=disabled", "logging.progress=false"]
    proc = subprocess.run([sys.executable, "-m", "longshard.cli", "train", "tiny_lm", *common, f"output_dir={out}"],
                          env=env_cpu, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads((out / "report.json").read_text())["val_loss"]
    ckpt = out / "checkpoints" / "step_00000002"
    proc = subprocess.run([sys.executable, "-m", "longshard.cli", "eval", str(ckpt)], env=env_cpu,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads(proc.stdout)["val_loss"]
    # the same operations in the same dtype give the same number (bitwise here; 1e-7 = fp32 rounding allows
    # a different summation order); evaluated in fp32 instead, this run's loss moved by 3.7e-6 relative
    assert abs(evaluated - trained) / trained < 1e-7, (evaluated, trained)


def test_planning_and_checking_never_load_the_trainer():
    """The build is linear: `longshard plan`, `train --dry-run` and the config checks resolve the model and
    the layout from `train/resolve.py`; the module that runs training is not imported for them."""
    code = ("import sys; from longshard.cli import main; "
            "assert main(['plan', 'tiny_lm', '--gpus', '2']) == 0; "
            "assert main(['train', 'tiny_lm', '--dry-run']) == 0; "
            "assert 'longshard.train.trainer' not in sys.modules, 'trainer imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd="/tmp")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_with_its_measured_cost(caplog):
    """bf16 training on a CPU that emulates it ran about 15x slower than fp32 without a word; the
    ratio is measured at start-up and a ratio above 2 is a warning saying what to use instead."""
    from longshard.train.precision import cpu_bf16_slowdown, warn_if_slow_cpu_bf16

    assert warn_if_slow_cpu_bf16("fp32", "cpu") is None and warn_if_slow_cpu_bf16("bf16", "cuda") is None
    assert warn_if_slow_cpu_bf16("bf16", "cpu", slowdown=lambda: 14.7) == 14.7
    assert "bf16 matmul measured 14.7x slower than fp32 here" in caplog.text and "train.dtype=fp32" in caplog.text
    caplog.clear()
    warn_if_slow_cpu_bf16("bf16", "cpu", slowdown=lambda: 0.6)
    assert "slower" not in caplog.text
    assert 0 < cpu_bf16_slowdown(n=64, reps=2) < 1000  # the real measurement runs and gives a ratio
