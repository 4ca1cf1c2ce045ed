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
    """The quickstart recipe as shipped (2 processes, sequence parallel, wandb offline), shortened to 20 steps."""
    import os

    out = tmp_path_factory.mktemp("qs") / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = _cli("train", "quickstart", "train.steps=20", "checkpoint.every=10", "eval.mqar_samples=8",
                f"output_dir={out}", env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, env, proc.stderr


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """The tiny_lm recipe (a dense language model on the embedded corpus), shortened to 20 steps."""
    import os

    out = tmp_path_factory.mktemp("lm") / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled")
    proc = _cli("train", "tiny_lm", "train.steps=20", "checkpoint.every=10", "data.default_corpus_bytes=400000",
                "eval.passkey_samples=2", f"output_dir={out}", env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, env


@pytest.mark.dist
def test_quickstart_leaves_artifacts(quickstart_run):
    """The main job: an S2 / dense hybrid, sequence parallel over its 2 processes (the S2 layer exchanges
    only the K/V blocks it reads), trained on Zoology's MQAR with a length warmup; its report carries the
    recall accuracy by key-to-query distance and the bytes the exchange saved against a dense ring."""
    out, _, stderr = quickstart_run
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["sp_degree"] == 2 and len(report["losses"]) == 20
    assert report["losses"][-1] < report["losses"][0]
    assert {"val_loss", "mqar_acc", "mqar_acc@16", "mqar_acc@256"} <= set(report)
    traffic = report["sp_traffic"]
    assert traffic["sparse_exchange_layers"] == 1
    # measured by the communication counter during the last step == the exchange plan's analytic bytes
    assert traffic["measured_sparse_exchange_bytes_per_step"] == traffic["sparse_exchange_bytes_per_step"] > 0
    # a dense ring over 2 ranks sends K/V once each way plus fp32 gradients: (2 + 2 + 4) x B x Hkv x L x D x 4 bytes
    assert traffic["dense_ring_bytes_per_step"] == 16 * 2 * 128 * 32 * 4 * (2 + 2 + 4)
    assert 0.5 < traffic["saved_fraction"] < 1
    assert f"a dense ring {traffic['dense_ring_bytes_per_step'] / 1e6:.3g} MB" in stderr
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000010", "step_00000020"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gb", "attn_kept_fraction",
            "comm/sparse_kv_bytes", "comm/ring_p2p_bytes"} <= set(lines[0])
    # every logged name is documented in docs/metrics.md's table (comm/<op>_* and passkey_acc@<L> by pattern)
    page = (REPO / "docs" / "metrics.md").read_text()
    table = page[page.index("## Metrics"):page.index("## Evaluation")]
    documented = set(re.findall(r"`([A-Za-z_@/<>]+)`", table))
    for line in lines:
        for key in set(line) - {"step"}:
            generic = re.sub(r"^comm/[a-z0-9_]+_(bytes|calls)$", r"comm/<op>_\1", re.sub(r"@\d+$", "@<L>", key))
            generic = re.sub(r"^aux/layer\d+$", "aux/layer<i>", generic)
            assert generic in documented, f"metric {key!r} is not documented in docs/metrics.md"
    assert 0 < lines[0]["attn_kept_fraction"] < 1  # the S2 layer keeps part of the causal blocks
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run was written"


@pytest.mark.dist
def test_eval_and_export(lm_run, tmp_path):
    out, env = lm_run
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
    # training and both evaluations log to the one wandb run of the training folder (its id), not to new runs
    run_id = (out / "wandb" / "longshard_run_id").read_text().strip()
    assert {p.name.rsplit("-", 1)[1] for p in (out / "wandb").glob("offline-run-*")} == {run_id}
    assert len(list((out / "wandb").glob("offline-run-*"))) >= 3

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

    proc = _cli("launch", "slurm", "tiny_lm", "train.steps=1000", "train.global_batch_size=128", "--nodes", "4",
                "--gpus-per-node", "8", "--partition", "gpu", "--dry-run", env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for needle in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                   "#SBATCH --partition=gpu", "srun", "--rdzv-backend=c10d", "procs=8",
                   '-m longshard.train.main tiny_lm train.steps=1000 train.global_batch_size=128 "$resume"',
                   "resume=checkpoint.resume=auto",
                   "scontrol requeue", "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@120"):
        assert needle in text, needle
    assert "{{" not in text
    for hard_coded in ("29500", "cpus-per-task=32", sys.executable):  # friction 7: nothing of the submit host
        assert hard_coded not in text, hard_coded
    proc = _cli("launch", "slurm", "tiny_lm", "--nodes", "2", "--gpus-per-node", "2", "--output",
                str(tmp_path / "job.sbatch"), "--log-dir", str(tmp_path / "slurm-logs"), env=dict(os.environ))
    assert (tmp_path / "slurm-logs").is_dir()  # Slurm does not create its output folder
    assert proc.returncode == 0 and (tmp_path / "job.sbatch").read_text().startswith("#!/bin/bash")
    res = subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr  # valid shell syntax
    bad = _cli("launch", "slurm", "tiny_lm", "train.nope=1", "--nodes", "2", "--gpus-per-node", "4",
               "--dry-run", env=dict(os.environ))
    assert bad.returncode == 2 and "train.nope" in bad.stderr
    # the layout is checked at nodes x processes per node, as `train` will check it on the nodes
    bad = _cli("launch", "slurm", "tiny_lm", "--nodes", "3", "--gpus-per-node", "7", "--dry-run",
               env=dict(os.environ))
    assert bad.returncode == 2 and "train.global_batch_size: with --nodes 3 x 7 processes per node = 21 " \
        "processes: 16 is not divisible" in bad.stderr, bad.stderr[-1000:]
    # CPU nodes: no GPU request (sbatch rejects one on nodes without GPUs); processes from the recipe
    cpu = _cli("launch", "slurm", "tiny_lm", "--nodes", "2", "--gpus-per-node", "0", "--dry-run",
               env=dict(os.environ))
    assert cpu.returncode == 0, cpu.stderr[-1000:]
    assert "--gpus-per-node" not in cpu.stdout.split("srun")[0] and "procs=2\n" in cpu.stdout
    cpu4 = _cli("launch", "slurm", "tiny_lm", "--nodes", "2", "--gpus-per-node", "0", "--procs-per-node", "4",
                "--dry-run", env=dict(os.environ))
    assert cpu4.returncode == 2 and "= 8 processes" in cpu4.stderr


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
        ["bash", str(REPO / "launch" / "torchrun.sh"), "tiny_lm", "train.steps=2", "model.n_layers=1",
         "model.attention=[{name: dense}]", "data.default_corpus_bytes=200000", "eval.passkey_samples=0",
         "logging.wandb=disabled", f"output_dir={tmp_path / 'r'}"],
        env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "r" / "report.json").read_text())["world_size"] == 2


def _readme_commands() -> list[str]:
    """The ```bash lines of the README, then of each page under docs/ (alphabetical), in order."""
    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


@pytest.mark.dist
def test_every_readme_command_works(quickstart_run, lm_run, tmp_path, monkeypatch, capsys):
    """The README's command block, in the order written, right after the quickstart (its run folder is
    runs/quickstart here, 20 steps instead of 800), in a scratch folder; CKPT stands for a language
    model's checkpoint (tiny_lm's). Train and torchrun lines run as `longshard train --dry-run`, which
    checks what a run checks before its first step (config, host, layout, the checkpoint it would
    resume); launcher scripts get `bash -n`; the rest run for real, in this process."""
    import shlex

    from longshard.cli import main as cli_main

    tokenizers = pytest.importorskip("tokenizers")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart").symlink_to(quickstart_run[0])
    lm_ckpt = str(sorted((lm_run[0] / "checkpoints").iterdir())[-1])
    (tmp_path / "corpus").mkdir()
    for i in range(20):
        # ~31K tokens each: pretrain_small needs one global batch (64 x 8192 tokens) after the 1% held out
        (tmp_path / "corpus" / f"doc{i}.txt").write_text(f"document {i}: the quick brown fox jumps over it. " * 2200)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["the quick brown fox", "document jumps over"] * 50,
                            tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    monkeypatch.chdir(tmp_path)
    commands = _readme_commands()
    assert len(commands) >= 15
    ran = []
    for line in commands:
        if line.startswith("bash launch/install.sh"):  # the two top commands: the quickstart run and .ci/run
            continue
        for part in line.split(" ; "):
            words = shlex.split(part.replace("step_00000800", "step_00000020").replace("CKPT", lm_ckpt))
            if words[0].startswith("NPROC=") or words[0].startswith("launch/"):
                script = next(w for w in words if w.startswith("launch/"))
                proc = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
                assert proc.returncode == 0, f"README: {line}\n{proc.stderr}"
                ran.append(part)
                continue
            if words[0] == "torchrun":  # what `longshard train` would start: check it the same way
                nproc = words[1].split("=")[-1] if "=" in words[1] else words[2]
                rest = words[words.index("longshard.train.main") + 1:]
                words = ["longshard", "train", *rest, "--nproc", nproc]
            if words[:2] == ["longshard", "train"] and "--dry-run" not in words:
                words.append("--dry-run")
            assert words[0] == "longshard", line
            capsys.readouterr()
            rc = cli_main(words[1:])
            printed = capsys.readouterr()
            assert rc == 0, f"README: {line}\n{printed.out[-1500:]}\n{printed.err[-3000:]}"
            if "launch slurm" in part:
                check = subprocess.run(["bash", "-n"], input=printed.out, capture_output=True, text=True)
                assert check.returncode == 0, check.stderr
            ran.append(part)
    assert len(ran) >= 17


@pytest.mark.dist
def test_layout_errors_come_before_any_worker_and_a_sigkilled_worker_is_explained(tmp_path):
    """Frictions 3 and 4: a layout that cannot work is one clean message from the CLI (no torchrun,
    no per-rank ChildFailedError); more CPU processes than cores is a warning; a worker killed by
    SIGKILL (drill) gets the out-of-memory explanation."""
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", WANDB_MODE="disabled")
    for overrides, message in (
        (["parallel.sp_degree=4"], "parallel.sp_degree: sp_degree=4 x tp_degree=1 does not divide the world size 2"),
        (["parallel.sp_degree=2", "model.n_heads=3", "model.n_kv_heads=1", "model.dim=96"],
         "3 query heads do not split over 2 Ulysses ranks"),
        (["train.global_batch_size=6", "train.micro_batch_size=2"], "train.global_batch_size: 6 is not divisible"),
    ):
        proc = _cli("train", "tiny_lm", *overrides, f"output_dir={tmp_path / 'x'}", env=env)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert "launching" not in proc.stderr and "ChildFailedError" not in proc.stderr
        assert not (tmp_path / "x").exists()
    cores = len(os.sched_getaffinity(0))
    proc = _cli("train", "tiny_lm", f"train.nproc={2 * cores}", "--dry-run", env=env)
    assert proc.returncode == 0 and f"train.nproc={2 * cores} CPU processes on {cores} cores" in proc.stderr
    drill = dict(env, LONGSHARD_INJECT_FAULT="kill:rank=1:step=2")
    proc = _cli("train", "tiny_lm", "train.steps=3", "data.default_corpus_bytes=400000", "eval.passkey_samples=0",
                "logging.wandb=disabled", f"output_dir={tmp_path / 'k'}", "parallel.collective_timeout_s=30", env=drill)
    assert proc.returncode != 0
    assert "a worker was killed by SIGKILL (exit -9)" in proc.stderr and "out-of-memory" in proc.stderr, \
        proc.stderr[-3000:]


def test_slurm_script_requeues_only_at_the_time_limit(tmp_path):
    """Friction 7, run for real with stub `srun` / `scontrol` (no Slurm here: Debian's slurm-wlm is not
    installed on the test machines and cannot be installed without network): USR1 (the time-limit
    signal) stops the step and re-queues; TERM (`scancel`) stops it without re-queueing; the user's
    checkpoint.resume is used by the first launch and `auto` after a re-queue; the port comes from the
    job id, OpenMP threads from cpus per task / processes; overrides may follow the flags."""
    import os
    import signal
    import time

    start = tmp_path / "ckpt" / "step_00000100"  # the folder a run should start from (checked to exist)
    start.mkdir(parents=True)
    proc = _cli("launch", "slurm", "tiny_lm", "--nodes", "1", "--gpus-per-node", "4", "--cpus-per-task", "16",
                "--mem", "0", "--exclusive", "--dry-run", "train.steps=9", f"checkpoint.resume={start}",
                env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / "job.sbatch"
    script.write_text(proc.stdout)
    for needle in ("#SBATCH --cpus-per-task=16", "#SBATCH --mem=0", "#SBATCH --exclusive"):
        assert needle in proc.stdout
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        f"echo \"srun OMP=$OMP_NUM_THREADS $*\" >> {log}\n"
        f"trap 'echo srun-got-term >> {log}; exit 0' TERM\n"
        "while true; do sleep 0.05; done\n")
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        "if [ \"$1\" = show ]; then echo node1; exit 0; fi\n"
        f"echo \"scontrol $*\" >> {log}\n")
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node1", SLURM_JOB_ID="1234",
               SLURM_CPUS_PER_TASK="16")
    env.pop("OMP_NUM_THREADS", None)

    def run(sig, restart: str) -> str:
        log.write_text("")
        job = subprocess.Popen(["bash", str(script)], env=dict(env, SLURM_RESTART_COUNT=restart))
        deadline = time.time() + 30
        while "srun " not in log.read_text() and time.time() < deadline:
            time.sleep(0.05)
        job.send_signal(sig)
        assert job.wait(timeout=30) == 0
        return log.read_text()

    first = run(signal.SIGUSR1, "0")
    assert "srun-got-term" in first and "scontrol requeue 1234" in first
    assert "OMP=4 " in first and "--rdzv-endpoint=node1:21234" in first  # 16 cpus / 4 processes; 20000 + 1234
    assert f"train.steps=9 checkpoint.resume={start}" in first
    again = run(signal.SIGTERM, "1")
    assert "srun-got-term" in again and "requeue" not in again
    assert "checkpoint.resume=auto" in again and str(start) not in again
