"""Signals and failing processes: SIGTERM checkpoints (also during start-up), a hung or failing rank is
named, exit codes and logs survive, no worker outlives the launcher, a damaged file read by one rank
stops every rank."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import torchrun_cmd
from train_runs import TINY, _losses, _run, _worker_pids

pytestmark = pytest.mark.dist


def test_sigterm_writes_checkpoint_and_resume_is_exact(tmp_path, data_dir, env_cpu):
    """SIGTERM to the launcher (what Slurm pre-emption does): every rank finishes its step, writes one
    checkpoint and exits cleanly; resuming continues with exactly the losses of an uninterrupted run."""
    extra = ["checkpoint.every=0", "optim.schedule=constant", "parallel.dp_mode=ddp", "eval.at_end=false"]
    out = tmp_path / "pre"
    args = ["tiny_lm", *TINY, "data.source=prepared", f"data.path={data_dir}", f"output_dir={out}", *extra,
            "train.steps=500", "checkpoint.save_final=false"]
    proc = subprocess.Popen(torchrun_cmd(2, "-m", "longshard.train.main", *args), env=env_cpu, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert re.search(r"pre-empted \(SIGTERM\)(: wrote the checkpoint of step| during step \d+, after micro-batch 1 "
                     r"of 2: its update was not applied)", err), err[-4000:]
    report = json.loads((out / "report.json").read_text())
    k = report["preempted_at_step"]
    assert k is not None and 2 <= k < 500 and len(report["losses"]) == k
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{k:08d}"]

    _run(2, out, data_dir, [*extra, f"train.steps={k + 2}", "checkpoint.resume=auto"], env_cpu)
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["resumed_from_step"] == k and resumed["preempted_at_step"] is None
    _run(2, tmp_path / "straight", data_dir, [*extra, f"train.steps={k + 2}"], env_cpu)
    assert resumed["losses"] == _losses(tmp_path / "straight")


def test_a_stop_does_not_wait_for_the_optimizer_step_and_resume_is_exact(tmp_path, data_dir, env_cpu):
    """SIGTERM as step 3 starts, with 8 micro-batches per step: the ranks stop after the first micro-batch
    (not after all 8), drop its gradients and put back the data position and random state; step 2's
    checkpoint holds the weights, and resuming gives exactly the losses of an uninterrupted run."""
    extra = ["train.micro_batch_size=1", "checkpoint.every=0", "eval.at_end=false", "train.steps=4"]
    out = tmp_path / "stopped"
    proc = _run(1, out, data_dir, extra, dict(env_cpu, LONGSHARD_INJECT_FAULT="term:rank=0:step=3"))
    assert "pre-empted (SIGTERM) during step 3, after micro-batch 1 of 8: its update was not applied; the " \
           "checkpoint of step 2" in proc.stderr, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["preempted_at_step"] == 2 and len(report["losses"]) == 2
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
    _run(1, out, data_dir, [*extra, "checkpoint.resume=auto"], env_cpu)
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["resumed_from_step"] == 2
    _run(1, tmp_path / "straight", data_dir, extra, env_cpu)
    assert resumed["losses"] == _losses(tmp_path / "straight")


@pytest.mark.slow  # default suite under ~15 min on 2 cores: the same collective timeout naming the hung rank
# stays covered by test_faults.py::test_a_rank_stalled_in_a_checkpoint_save_is_named_and_not_blamed_on_memory (42 s)
def test_hung_rank_times_out_with_an_error_naming_it(tmp_path, data_dir, env_cpu):
    """Rank 1 hangs at step 2: rank 0's collective times out after parallel.collective_timeout_s with an
    error naming rank, step and phase (no endless hang, no bare backend trace)."""
    env = dict(env_cpu, LONGSHARD_INJECT_FAULT="hang:rank=1:step=2")
    t0 = time.time()
    proc = _run(2, tmp_path / "hang", data_dir, ["train.steps=4", "parallel.collective_timeout_s=5"], env,
                check=False, timeout=180)
    assert proc.returncode != 0
    assert time.time() - t0 < 150
    assert re.search(r"CollectiveError: rank 0: a collective failed during the training step of step 2 "
                     r"\(.*[Tt]imed out", proc.stderr), proc.stderr[-4000:]
    assert "parallel.collective_timeout_s=5" in proc.stderr


@pytest.mark.parametrize("world", ["1", "2"])
def test_worker_exit_keeps_code_and_flushes_logs(world):
    """A torchrun worker leaves through os._exit (no interpreter teardown to abort a finished run);
    its exit code and its last log line must survive that."""
    code = ("import logging, sys; from longshard.parallel.env import exit_worker; "
            "logging.basicConfig(stream=sys.stderr); logging.getLogger('x').warning('last line'); "
            "sys.stdout.write('buffered'); exit_worker(3)")
    env = {**os.environ, "WORLD_SIZE": world}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert "last line" in proc.stderr and proc.stdout == "buffered"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal and /proc are Linux")
@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_no_worker_outlives_the_launcher(tmp_path, data_dir, env_cpu, how):
    """`longshard train` with 2 workers: SIGTERM to it is forwarded (workers checkpoint and stop);
    SIGKILL to it takes torchrun and the workers down with it (parent-death signals). No orphan."""
    out = tmp_path / f"orphans_{how}"
    args = [sys.executable, "-m", "longshard.cli", "train", "tiny_lm", *TINY,
            "data.source=prepared", f"data.path={data_dir}", f"output_dir={out}", "train.steps=100000",
            "train.log_every=1", "checkpoint.every=0", "--nproc", "2"]
    cli = subprocess.Popen(args, env=env_cpu, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        deadline = time.time() + 120
        while cli.poll() is None and time.time() < deadline and not ((out / "metrics.jsonl").is_file()
                                              and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            time.sleep(0.5)
        workers = _worker_pids(str(out))
        assert cli.poll() is None and len(workers) >= 2, workers  # torchrun and its workers carry the marker
        cli.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        deadline = time.time() + 90
        while time.time() < deadline and _worker_pids(str(out)):
            time.sleep(0.5)
        assert not _worker_pids(str(out)), "workers outlived the launcher"
        if how == "sigterm":
            assert cli.wait(timeout=30) is not None
            assert json.loads((out / "report.json").read_text())["preempted_at_step"] is not None
    finally:
        for pid in _worker_pids(str(out)):
            os.kill(pid, signal.SIGKILL)
        if cli.poll() is None:
            cli.kill()


def test_sigterm_during_start_up_stops_every_rank_cleanly(tmp_path, data_dir, env_cpu):
    """A SIGTERM that reaches one rank while the run is starting (drill: rank 1 sends
    itself SIGTERM right after building the model, before any checkpoint is loaded) used to kill it
    with the default action and leave its peer in a CollectiveError; now both ranks stop before the
    first step, exit 0, and a resume continues from the previous checkpoint."""
    out = tmp_path / "r"
    _run(2, out, data_dir, ["train.steps=2", "checkpoint.every=2"], env_cpu)
    env = dict(env_cpu, LONGSHARD_INJECT_FAULT="term:rank=1:step=0")
    proc = _run(2, out, data_dir, ["train.steps=4", "checkpoint.every=2", "checkpoint.resume=auto"], env)
    assert "pre-empted (signal on another rank) during start-up, before step 3" in proc.stderr, proc.stderr[-3000:]
    assert "CollectiveError" not in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["preempted_at_step"] == 2 and report["resumed_from_step"] == 2
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]


def test_ctrl_c_as_the_workers_start_is_never_lost(tmp_path, data_dir, env_cpu):
    """Ctrl-C (SIGINT to ``longshard train``, passed on as SIGTERM) the moment the worker processes exist,
    long before they finished importing torch: workers inherited SIGTERM *ignored* from the agent and the
    run trained on. Now the agent blocks it, the signal waits until the worker's first handler (installed
    before the heavy imports) and every rank stops before its first step, exit 0."""
    out = tmp_path / "r"
    args = ["tiny_lm", *TINY, "data.source=prepared", f"data.path={data_dir}", f"output_dir={out}", "train.steps=40",
            "train.nproc=2"]
    proc = subprocess.Popen([sys.executable, "-m", "longshard.cli", "train", *args], env=env_cpu, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(_worker_pids(str(out))) < 2 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "during start-up" in err and "stopped without training" in err, err[-3000:]
    assert "SIGINT received: asking the workers to checkpoint and stop" in err  # the stop names what the user sent
    assert json.loads((out / "report.json").read_text())["losses"] == []


def test_damaged_tokens_read_by_one_rank_stop_every_rank(tmp_path, data_dir, env_cpu):
    """A token id beyond the vocabulary inside a window only rank 1 reads at step 1: rank 1 names the
    file and the token position, rank 0 stops with it at the same step (the flag rides on the step's
    token-count all-reduce) instead of waiting for the collective timeout."""
    import shutil

    import numpy as np
    from longshard.train.config import load_config
    from longshard.train.data import DistributedLoader, TokenWindows, read_meta

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    cfg = load_config("tiny_lm", TINY)
    windows = TokenWindows(data, "train", cfg.train.seq_len)
    order = DistributedLoader(list(range(len(windows))), micro_batch_size=2, grad_accum=2, dp_rank=1, dp_size=2,
                              seed=cfg.train.seed)._perm
    rank1 = {int(i) for i in order[2:4]} | {int(i) for i in order[6:8]}  # rank 1's two micro-batches, step 1
    rank0 = {int(i) for i in order[0:2]} | {int(i) for i in order[4:6]}
    target = min(rank1)
    at = target * cfg.train.seq_len + 5  # inside that window only (windows overlap by one token)
    assert all(at not in range(i * cfg.train.seq_len, (i + 1) * cfg.train.seq_len + 1) for i in rank0)
    meta = read_meta(data)
    tokens = np.memmap(data / "train.bin", dtype=meta["dtype"], mode="r+")
    tokens[at] = meta["vocab_size"] + 3
    tokens.flush()
    del tokens
    t0 = time.time()
    proc = _run(2, tmp_path / "r", data, ["train.steps=2", "parallel.collective_timeout_s=600"], env_cpu,
                check=False)
    assert proc.returncode != 0 and time.time() - t0 < 120
    assert "[rank1]" in proc.stderr and f"holds token id {meta['vocab_size'] + 3} (at token {at})" in proc.stderr
    assert "another rank could not read its batch of step 1" in proc.stderr, proc.stderr[-3000:]
    assert "CollectiveError" not in proc.stderr



def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (Linux /proc), as a Slurm job step's cgroup holds them."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def test_signalling_every_process_with_wandb_offline_still_checkpoints_and_exits_0(tmp_path, data_dir, env_cpu):
    """A cluster signals every process of the job step, wandb's service (a child of rank 0) included:
    with the recipes' default ``logging.wandb: offline`` rank 0 then died in wandb's finish
    (ConnectionResetError), rank 1 in the pre-emption check, no checkpoint and no report. Now a wandb
    failure is logged and ends wandb logging only: the interrupted step's checkpoint, report.json, exit 0."""
    env = {k: v for k, v in env_cpu.items() if k != "WANDB_MODE"}
    out = tmp_path / "r"
    args = ["tiny_lm", *TINY, "data.source=prepared", f"data.path={data_dir}", f"output_dir={out}", "train.steps=400",
            "train.nproc=2", "checkpoint.every=0", "checkpoint.save_final=false", "logging.wandb=offline",
            "eval.at_end=false"]
    proc = subprocess.Popen([sys.executable, "-m", "longshard.cli", "train", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    everyone = _descendants(proc.pid)
    assert any("wandb" in open(f"/proc/{p}/cmdline").read() for p in everyone if os.path.exists(f"/proc/{p}")), \
        "no wandb service process to signal"
    for pid in everyone:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-4000:]
    report = json.loads((out / "report.json").read_text())
    k = report["preempted_at_step"]
    assert k is not None and (out / "checkpoints" / f"step_{k:08d}").is_dir(), err[-3000:]
