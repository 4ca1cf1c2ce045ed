"""Tensor parallel (DTensor, Megatron-style head/FFN split) on gloo: sharded == unsharded, composes
with sequence parallel and FSDP2, trains the tp=1 losses; bad layouts are config errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, torchrun_cmd
from longshard.errors import ConfigError
from longshard.train.config import load_config


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [2, 4])
def test_tensor_parallel_matches_single_process(nproc, env_cpu):
    """2: TP 2; 4: TP 2 x Ulysses 2 and TP 2 x ring 2 (tests/dist/tp_check.py)."""
    proc = subprocess.run(torchrun_cmd(nproc, str(REPO / "tests" / "dist" / "tp_check.py")), env=env_cpu,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.dist
def test_tp_x_sp_training_equals_single_process(tmp_path, env_cpu):
    from longshard.train.data import prepare_default

    prepare_default(tmp_path / "data", 200_000)
    common = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
              "model.attention=[{name: s2, options: {block: 8, local_blocks: 2, vert_stride: 2}}, {name: dense}]",
              "train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=3",
              "logging.wandb=disabled", "logging.progress=false", "eval.passkey_samples=1",
              "eval.passkey_lengths=[128]", "eval.val_batches=2", "data.source=prepared",
              f"data.path={tmp_path / 'data'}"]
    one = subprocess.run([sys.executable, "-m", "longshard.train.main", "tiny_lm", *common,
                          f"output_dir={tmp_path / 'one'}"], env=env_cpu, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    four = subprocess.run(torchrun_cmd(4, "-m", "longshard.train.main", "tiny_lm", *common,
                                       "parallel.tp_degree=2", "parallel.sp_degree=2", "parallel.dp_mode=fsdp2",
                                       f"output_dir={tmp_path / 'four'}"),
                          env=env_cpu, capture_output=True, text=True)
    assert four.returncode == 0, four.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "report.json").read_text())
    b = json.loads((tmp_path / "four" / "report.json").read_text())
    assert (b["tp_degree"], b["sp_degree"]) == (2, 2)
    for x, y in zip(a["losses"], b["losses"]):  # fp32, sums regrouped over ranks (~1e-7 observed)
        assert abs(x - y) / x <= 1e-5, (a["losses"], b["losses"])
    assert abs(a["val_loss"] - b["val_loss"]) / a["val_loss"] <= 1e-5


def test_tp_layout_errors():
    with pytest.raises(ConfigError, match="parallel.dp_mode.*FSDP2"):
        load_config("tiny_lm", ["parallel.tp_degree=2"])
    with pytest.raises(ConfigError, match="parallel.tp_degree.*nosa"):
        load_config("tiny_lm", ["parallel.tp_degree=2", "parallel.dp_mode=fsdp2",
                                   "model.attention=[{name: nosa}]"])
    with pytest.raises(ConfigError, match="parallel.tp_degree.*heads do not split"):
        load_config("tiny_lm", ["parallel.tp_degree=4", "parallel.dp_mode=fsdp2"])  # 6 query / 2 KV heads
    with pytest.raises(ConfigError, match="parallel.tp_degree.*native"):
        load_config("tiny_lm", ["parallel.tp_degree=2", "train.engine=deepspeed"])
    with pytest.raises(ConfigError, match="parallel.tp_degree"):
        load_config("tiny_lm", ["parallel.tp_degree=0"])


@pytest.mark.dist
@pytest.mark.slow  # ~50 s; TP training equality stays in the default suite
def test_tp_checkpoint_resume_repeats_straight_run(tmp_path, env_cpu):
    """TP 2 + FSDP2: DCP checkpoint at step 4, resume to 6 == an uninterrupted 6-step run."""
    from longshard.train.data import prepare_default

    prepare_default(tmp_path / "data", 200_000)
    common = ["model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "train.seq_len=64",
              "train.micro_batch_size=2", "train.global_batch_size=4", "logging.wandb=disabled",
              "logging.progress=false", "eval.passkey_samples=0", "eval.val_batches=1", "data.source=prepared",
              f"data.path={tmp_path / 'data'}", "parallel.tp_degree=2", "parallel.dp_mode=fsdp2",
              "checkpoint.every=2"]
    runs = [("cut", ["train.steps=4"]), ("cut", ["train.steps=6", "checkpoint.resume=auto"]),
            ("straight", ["train.steps=6"])]
    for out, extra in runs:
        proc = subprocess.run(torchrun_cmd(2, "-m", "longshard.train.main", "tiny_lm", *common, *extra,
                                           f"output_dir={tmp_path / out}"),
                              env=env_cpu, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    cut = json.loads((tmp_path / "cut" / "report.json").read_text())
    straight = json.loads((tmp_path / "straight" / "report.json").read_text())
    assert cut["resumed_from_step"] == 4
    assert cut["losses"] == straight["losses"]
