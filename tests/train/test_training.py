"""End-to-end training on CPU processes: ranks and layouts agree with one process, same seed gives the
same losses, precision modes (bf16 + activation checkpointing, fp16 loss scaling) train, a non-finite
loss or gradient never reaches the weights, and learned streaming gates train and export."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from train_runs import _losses, _run

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("dp_mode", ["ddp", "fsdp2"])
def test_two_ranks_match_one(tmp_path, data_dir, env_cpu, dp_mode):
    """2 ranks x 2 accumulation steps == 1 rank x 4 (same global batch): fp32 losses within 1e-5."""
    extra = ["train.steps=3", f"parallel.dp_mode={dp_mode}"]
    _run(1, tmp_path / "one", data_dir, extra, env_cpu)
    _run(2, tmp_path / "two", data_dir, extra, env_cpu)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert one[0] != one[2]  # training moved the loss, so step 3 checks two updates
    for i, (a, b) in enumerate(zip(one, two)):
        # fp32 all-reduce sums in a different order than one process: ~1e-7 relative.
        assert abs(a - b) / abs(a) <= 1e-5, f"step {i + 1}: 1 rank {a} vs 2 ranks {b}"


def test_same_seed_and_layout_give_bit_identical_losses(tmp_path, data_dir, env_cpu):
    extra = ["train.steps=3", "parallel.dp_mode=fsdp2", "train.seed=7"]
    _run(2, tmp_path / "a", data_dir, extra, env_cpu)
    _run(2, tmp_path / "b", data_dir, extra, env_cpu)
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")  # exact equality, not a tolerance
    _run(2, tmp_path / "c", data_dir, ["train.steps=1", "parallel.dp_mode=fsdp2", "train.seed=8"], env_cpu)
    assert _losses(tmp_path / "c")[0] != _losses(tmp_path / "a")[0]  # the seed matters: the check can fail


def test_layout_error_before_training(tmp_path, data_dir, env_cpu):
    """global batch 6 cannot split over 2 ranks x micro 3... it can; 2 ranks x micro 2 cannot make 6."""
    proc = _run(2, tmp_path / "bad", data_dir, ["train.global_batch_size=6"], env_cpu, check=False)
    assert proc.returncode != 0
    assert "train.global_batch_size" in proc.stderr and "not divisible" in proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_bf16_and_activation_checkpointing(tmp_path, data_dir, env_cpu):
    """Full activation checkpointing and activation offload keep the same fp32 ops: identical losses;
    bf16 autocast trains."""
    base = ["train.steps=3"]
    _run(1, tmp_path / "plain", data_dir, base, env_cpu)
    _run(1, tmp_path / "ac", data_dir, [*base, "train.activation_checkpointing=full"], env_cpu)
    assert _losses(tmp_path / "plain") == _losses(tmp_path / "ac")
    # saved attention activations in host memory (accounted on CPU), with LightSeq-style checkpointing:
    # the same fp32 ops, so the same losses
    off = [*base, "train.activation_offload=attention", "train.activation_checkpointing=attention_boundary"]
    _run(1, tmp_path / "off", data_dir, off, env_cpu)
    assert _losses(tmp_path / "plain") == _losses(tmp_path / "off")
    logged = [json.loads(x) for x in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in logged if "loss" in rec]
    assert steps and all(rec["offloaded_act_gb"] > 0 for rec in steps)
    _run(1, tmp_path / "bf16", data_dir, [*base, "train.dtype=bf16"], env_cpu)
    bf16 = _losses(tmp_path / "bf16")
    # bf16 matmuls (8-bit mantissa) move the loss by ~1e-2 relative, not more
    assert all(abs(a - b) / a < 0.05 for a, b in zip(bf16, _losses(tmp_path / "plain")))


def test_fp16_loss_scaling_trains_and_resumes_its_scale(tmp_path, data_dir, env_cpu):
    """fp16 under FSDP2 on 2 ranks (ShardedGradScaler: overflow agreed across ranks): trains within fp16
    error of the fp32 run, logs the loss scale, checkpoints it and resumes from it."""
    fp32 = tmp_path / "fp32"
    _run(2, fp32, data_dir, ["train.steps=3", "parallel.dp_mode=fsdp2"], env_cpu)
    out = tmp_path / "fp16"
    fp16 = ["train.dtype=fp16", "parallel.dp_mode=fsdp2", "checkpoint.every=1"]
    _run(2, out, data_dir, ["train.steps=2", *fp16], env_cpu)
    state_file = out / "checkpoints" / "step_00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["grad_scaler"]["scale"] == 65536.0  # torch's initial scale: no overflow, no growth yet
    state["grad_scaler"]["scale"] = 1024.0  # a scale the resumed run can only have from the checkpoint
    state_file.write_text(json.dumps(state))
    _run(2, out, data_dir, ["train.steps=3", *fp16, "checkpoint.resume=auto"], env_cpu)
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_step"] == 2
    # fp16 matmuls (10-bit mantissa) move this model's loss by ~1e-4 relative; 1e-2 admits no wrong step
    assert all(abs(a - b) / a < 1e-2 for a, b in zip(report["losses"], _losses(fp32))), (report["losses"],
                                                                                          _losses(fp32))
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["loss_scale"] for rec in logged if "loss" in rec][-1] == 1024.0


def test_nan_loss_stops_with_clear_error(tmp_path, data_dir, env_cpu):
    proc = _run(1, tmp_path / "nan", data_dir, ["train.steps=3", "model.init_std=1e30"], env_cpu, check=False)
    assert proc.returncode != 0
    # init_std=1e30: the normed loss may stay finite while the gradient does not; either is named
    assert re.search(r"(loss is (nan|inf)|gradient norm is (nan|inf) \(loss \S+\)) at step [123] \(rank 0\); "
                     r"nan_policy=stop", proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr  # a clear message, not a stack dump


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_gradient_never_reaches_the_weights(tmp_path, data_dir, env_cpu, policy):
    """optim.lr=1e6: the loss stays finite but the gradient norm turns NaN at step 3. The update is
    skipped (skip) or the run stops (stop) before the optimizer touches the weights; after too many
    skips in a row it stops; every checkpoint written holds finite weights."""
    import torch
    from longshard.models import ModelConfig, Transformer
    from longshard.train.checkpoint import complete_checkpoints, load_model_weights

    extra = ["train.steps=6", "optim.lr=1e6", "optim.warmup_steps=0", "checkpoint.every=1",
             f"train.nan_policy={policy}", "train.max_skipped_steps=2"]
    proc = _run(1, tmp_path / "run", data_dir, extra, env_cpu, check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert re.search(r"gradient norm is nan \(loss [0-9.]+\) at step \d", proc.stderr), proc.stderr[-2000:]
    assert "The weights were not updated" in proc.stderr and "Traceback" not in proc.stderr
    if policy == "skip":
        assert "3 steps in a row" in proc.stderr and proc.stderr.count("skipping the update") == 2
    ckpts = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert ckpts
    for path in ckpts:
        model = Transformer(ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2))
        load_model_weights(path, model)
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), path


def test_parameters_finite_sees_one_bad_value():
    import torch
    from longshard.train.loop import parameters_finite

    model = torch.nn.Linear(4, 3)
    assert parameters_finite(model, torch.device("cpu"))
    with torch.no_grad():
        model.weight[1, 2] = float("inf")
    assert not parameters_finite(model, torch.device("cpu"))


def test_learned_gates_train_and_export_assignment(tmp_path, data_dir, env_cpu):
    """Identification run: alpha gets the L1 penalty in the loss; `longshard heads` exports the split."""
    att = "model.attention=[{name: streaming_gated, options: {gate_l1: 0.05, block: 16, sink: 4, window: 16}}]"
    _run(1, tmp_path / "duo", data_dir, ["train.steps=3", att, "eval.at_end=false", "train.log_every=1"], env_cpu)
    lines = [json.loads(x) for x in (tmp_path / "duo" / "metrics.jsonl").read_text().splitlines()]
    # 2 layers x 2 KV heads with alpha = 1 at step 1
    assert lines[0]["step"] == 1 and lines[0]["aux_loss"] == pytest.approx(0.05 * 2 * 2, rel=1e-3)
    ckpt = tmp_path / "duo" / "checkpoints" / "step_00000003"
    out = subprocess.run([sys.executable, "-m", "longshard.cli", "heads", str(ckpt), "--threshold", "0.5"],
                         capture_output=True, text=True, env=env_cpu)
    assert out.returncode == 0, out.stderr[-2000:]
    import yaml

    doc = yaml.safe_load(out.stdout)
    assert "&id" not in out.stdout and "*id" not in out.stdout  # plain YAML: no anchors or aliases
    assert set(doc["retrieval_heads"]) == {0, 1}
    assert doc["model"]["attention"][0]["name"] == "streaming"
    assert doc["model"]["attention"][0]["options"] == {"block": 16, "sink": 4, "window": 16,
                                                       "retrieval_heads": doc["retrieval_heads"][0]}

