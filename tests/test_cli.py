"""The `longshard` command: quickstart run, data prepare, eval, export-hf, slurm launch."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from helpers import REPO


def _cli(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "longshard.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """The quickstart recipe as shipped (2 processes, wandb offline), shortened to 20 steps."""
    import os

    out = tmp_path_factory.mktemp("qs") / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = _cli("train", "quickstart", "train.steps=20", "checkpoint.every=10", "data.default_corpus_bytes=400000",
                "eval.passkey_samples=2", f"output_dir={out}", env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, env


@pytest.mark.dist
def test_quickstart_leaves_artifacts(quickstart_run):
    out, _ = quickstart_run
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and len(report["losses"]) == 20
    assert report["losses"][-1] < report["losses"][0]
    assert {"val_loss", "passkey_acc@256", "passkey_acc@512"} <= set(report)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000010", "step_00000020"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gb", "attn_kept_fraction"} <= set(lines[0])
    # every logged name is documented in the README's metrics table (comm/<op>_* and passkey_acc@<L> by pattern)
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Metrics"):readme.index("## DeepSpeed engine")]
    documented = set(re.findall(r"`([A-Za-z_@/<>]+)`", table))
    for line in lines:
        for key in set(line) - {"step"}:
            generic = re.sub(r"^comm/[a-z_]+_(bytes|calls)$", r"comm/<op>_\1", re.sub(r"@\d+$", "@<L>", key))
            assert generic in documented, f"metric {key!r} is not documented in README ## Metrics"
    assert lines[0]["attn_kept_fraction"] == 1.0  # quickstart is dense
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run was written"


@pytest.mark.dist
def test_eval_and_export(quickstart_run, tmp_path):
    out, env = quickstart_run
    ckpt = out / "checkpoints" / "step_00000020"
    proc = _cli("eval", str(ckpt), "eval.passkey_samples=1", "eval.passkey_lengths=[300]", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    report = json.loads((out / "report.json").read_text())
    # same weights, same held-out windows -> same validation loss as the trainer's final eval
    assert abs(res["val_loss"] - report["val_loss"]) / report["val_loss"] < 1e-5
    assert "passkey_acc@300" in res

    # lengths x depths grid, perplexity vs context length, MQAR, a PNG and an offline wandb eval run
    plot = tmp_path / "eval.png"
    proc = _cli("eval", str(ckpt), "eval.passkey_samples=1", "eval.passkey_lengths=[300,400]",
                "eval.passkey_depths=[0,1]", "eval.ppl_lengths=[64,256]", "eval.ppl_windows=2",
                "eval.mqar_samples=2", "eval.mqar_num_kv_pairs=4", "--grid", "--plot", str(plot), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert set(res["passkey_grid"]) == {"300", "400"} and set(res["passkey_grid"]["300"]) == {"0", "1"}
    assert res["ppl@64"] > 1 and res["ppl@256"] > 1 and 0 <= res["mqar_acc"] <= 1
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert any((out / "wandb").glob("offline-run-*")), "no offline wandb eval run"

    proc = _cli("export-hf", str(ckpt), "--output", str(tmp_path / "hf"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    from longshard.models.hf import load_hf_model

    ours = load_hf_model(tmp_path / "hf").eval()
    tokens = torch.randint(0, 259, (1, 33))
    with torch.no_grad():
        a, b = hf(tokens).logits, ours(tokens)
    assert float((a - b).abs().max() / a.abs().max()) < 1e-5  # fp32, same weights


def test_data_prepare_cli(tmp_path):
    import os

    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(30)))
    proc = _cli("data", "prepare", "--input", str(tmp_path / "docs.jsonl"), "--output", str(tmp_path / "d"),
                "--text-field", "body", "--val-fraction", "0.1", env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(proc.stdout)
    assert meta["splits"]["train"]["n_docs"] + meta["splits"]["val"]["n_docs"] == 30
    assert 2 <= meta["splits"]["val"]["n_docs"] <= 4  # ~10% of equally sized documents
    bad = _cli("data", "prepare", "--input", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "x"),
               env=dict(os.environ))
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_slurm_dry_run(tmp_path):
    import os

    proc = _cli("launch", "slurm", "quickstart", "train.steps=1000", "--nodes", "4", "--gpus-per-node", "8",
                "--partition", "gpu", "--dry-run", env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for needle in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                   "#SBATCH --partition=gpu", "srun", "--rdzv-backend=c10d", "--nproc-per-node=8",
                   "-m longshard.train.main quickstart train.steps=1000 checkpoint.resume=auto", "scontrol requeue"):
        assert needle in text, needle
    assert "{{" not in text
    proc = _cli("launch", "slurm", "quickstart", "--nodes", "2", "--gpus-per-node", "4", "--output",
                str(tmp_path / "job.sbatch"), env=dict(os.environ))
    assert proc.returncode == 0 and (tmp_path / "job.sbatch").read_text().startswith("#!/bin/bash")
    res = subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr  # valid shell syntax
    bad = _cli("launch", "slurm", "quickstart", "train.nope=1", "--nodes", "2", "--gpus-per-node", "4",
               "--dry-run", env=dict(os.environ))
    assert bad.returncode == 2 and "train.nope" in bad.stderr


def test_launch_scripts_are_valid_shell():
    for script in ("torchrun.sh", "deepspeed.sh", "install.sh"):
        res = subprocess.run(["bash", "-n", str(REPO / "launch" / script)], capture_output=True, text=True)
        assert res.returncode == 0, f"{script}: {res.stderr}"


@pytest.mark.dist
def test_torchrun_script_runs_training(tmp_path):
    import os

    env = dict(os.environ, NPROC="2", MASTER_PORT=str(__import__("helpers").free_port()), OMP_NUM_THREADS="1",
               WANDB_MODE="disabled")
    res = subprocess.run(
        ["bash", str(REPO / "launch" / "torchrun.sh"), "quickstart", "train.steps=2", "model.n_layers=1",
         "model.attention=[{name: dense}]", "data.default_corpus_bytes=200000", "eval.passkey_samples=0",
         "logging.wandb=disabled", f"output_dir={tmp_path / 'r'}"],
        env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "report.json").read_text())["world_size"] == 2
