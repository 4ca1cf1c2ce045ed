"""`longshard launch slurm` against a real Slurm: a single-node slurmctld + slurmd (+ munge) from
Debian's slurm-wlm packages, started here for the test (`.ci/run` installs them).

One CPU job of 2 processes, run twice: (1) `scancel --signal=USR1 --batch` (what the time-limit
warning sends): the ranks write the pre-emption checkpoint, the job is re-queued and resumes at the
next step, and the whole run has every step exactly once, ending COMPLETED with exit code 0;
(2) plain `scancel`: the ranks write the checkpoint and the job ends CANCELLED without a re-queue.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

NEEDED = ("slurmctld", "slurmd", "munged", "sbatch", "scancel", "scontrol", "sinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*cmd: str, env: dict, check: bool = True) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()[:500]}")
    return proc.stdout


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running single-node Slurm cluster; yields the environment its commands need."""
    missing = [c for c in NEEDED if shutil.which(c) is None]
    if missing:
        pytest.skip(f"Slurm is not installed here ({', '.join(missing)} missing): `.ci/run` installs Debian's "
                    "slurm-wlm and munge; elsewhere run `apt-get install slurm-wlm munge`")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:  # start munged if it is not up
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["mungekey", "--create"], capture_output=True)
        subprocess.run(["munged", "--force"], capture_output=True)
        time.sleep(1)
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            pytest.skip("munged could not be started (authentication for Slurm)")
    root = tmp_path_factory.mktemp("slurm")
    for d in ("state", "spool", "log"):
        (root / d).mkdir()
    host = socket.gethostname().split(".")[0]
    mem_mb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:"))) // 1024 // 2
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=longshardtest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}", "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "AuthInfo=cred_expire=10", "ReturnToService=2", "JobRequeue=1", "KillWait=30", "MpiDefault=none",
        "MinJobAge=600",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory={mem_mb} State=UNKNOWN",
        f"PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", ""]))
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}  # the recipes' default: wandb offline
    env.update(SLURM_CONF=str(conf), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", LONGSHARD_TEST_SLURM_LOGS=str(root))
    subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True, capture_output=True)
    subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True, capture_output=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        if _run("sinfo", "-h", "-o", "%T", env=env, check=False).strip() == "idle":
            break
        time.sleep(0.5)
    else:
        pytest.fail("the test Slurm cluster did not come up: " + (root / "log" / "slurmctld.log").read_text()[-2000:])
    yield env
    subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
    for pid_file in ("slurmd.pid", "slurmctld.pid"):
        try:
            os.kill(int((root / pid_file).read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass


def _job(env: dict, jid: str) -> dict[str, str]:
    text = _run("scontrol", "show", "job", jid, env=env)
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def _wait(env: dict, jid: str, done, what: str, timeout: float = 300) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _job(env, jid)
        if done(job):
            return job
        time.sleep(1)
    raise AssertionError(f"job {jid}: {what} not reached: {job}")


def _diagnosis(env: dict, job: dict[str, str], log: str) -> str:
    """What a failed job left: its record, the job's output and the daemons' last log lines."""
    root = Path(env["LONGSHARD_TEST_SLURM_LOGS"]) / "log"
    daemons = "".join(f"\n--- {f.name}:\n" + f.read_text()[-1500:] for f in sorted(root.glob("*.log")))
    return f"{job}\n--- job output:\n{log[-3000:]}{daemons}"


def _submit(tmp_path: Path, env: dict, name: str) -> tuple[str, Path, Path]:
    from longshard.cli import main

    out, logs = tmp_path / name, tmp_path / f"{name}-logs"
    script = tmp_path / f"{name}.sbatch"
    assert main(["launch", "slurm", "tiny_lm", "--nodes", "1", "--gpus-per-node", "0", "--time", "15:00",
                 "--python", sys.executable, "--output", str(script), "--log-dir", str(logs),
                 "train.steps=2000", "checkpoint.every=100000", "model.n_layers=1", "train.seq_len=64",
                 "train.global_batch_size=8", "data.default_corpus_bytes=100000", "eval.passkey_samples=0",
                 "eval.val_batches=1", "logging.progress=false", "train.log_every=1",
                 f"output_dir={out}"]) == 0
    jid = _run("sbatch", "--parsable", str(script), env=env).strip()
    deadline = time.time() + 180
    while not (out / "metrics.jsonl").exists():  # training has started
        assert time.time() < deadline, _job(env, jid)
        time.sleep(0.5)
    time.sleep(1)
    return jid, out, logs


@pytest.mark.dist
def test_a_real_slurm_job_is_preempted_requeued_and_resumed_or_cancelled_with_a_checkpoint(slurm, tmp_path):
    env = slurm
    # (1) the time-limit signal: checkpoint, re-queue, resume at the next step
    jid, out, logs = _submit(tmp_path, env, "usr1")
    _run("scancel", "--signal=USR1", "--batch", jid, env=env)
    _wait(env, jid, lambda j: j["Restarts"] == "1" and j["JobState"] == "PENDING", "the re-queue")
    first = json.loads((out / "report.json").read_text())
    stop = first["preempted_at_step"]
    assert stop is not None and 0 < stop < 2000
    assert (out / "checkpoints" / f"step_{stop:08d}").is_dir()
    # Slurm holds a re-queued job (Reason=BeginTime) for the credential lifetime (cred_expire, 10 s here, 120 s by
    # default); forcing an earlier start (StartTime=now) makes slurmd refuse the launch even with the node idle
    # (the job ends FAILED), so the test waits for Slurm's own start
    job = _wait(env, jid, lambda j: j["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), "the end")
    log = "".join(p.read_text() for p in logs.glob("*.out"))
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", _diagnosis(env, job, log)
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_from_step"] == stop and report["preempted_at_step"] is None
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    counts = collections.Counter(steps)
    assert sorted(counts) == list(range(1, 2001)), "a step was lost"
    assert all(n == 1 for s, n in counts.items() if s != 2000), "a step was recomputed"  # 2000: + final eval
    assert "Traceback" not in log and log.count("pre-empted (SIGTERM): wrote the checkpoint") == 2  # both ranks
    # the batch script says the stop was clean (after slurmstepd's CANCELLED line) and how to skip Slurm's hold
    assert log.count("the training step stopped cleanly after writing its checkpoint") == 1
    assert f"stopped cleanly at step {stop}, checkpoint {out / 'checkpoints' / f'step_{stop:08d}'}" in log
    assert f"re-queueing job {jid}" in log and "cred_expire" in log
    # (2) scancel: checkpoint and stop, no re-queue
    jid, out, logs = _submit(tmp_path, env, "cancel")
    _run("scancel", jid, env=env)
    job = _wait(env, jid, lambda j: j["JobState"] == "CANCELLED", "the cancellation")
    time.sleep(2)
    report = json.loads((out / "report.json").read_text())
    stop = report["preempted_at_step"]
    assert stop is not None and (out / "checkpoints" / f"step_{stop:08d}" / "trainer_state.json").is_file()
    assert _job(env, jid)["Restarts"] == "0"
    deadline = time.time() + 60  # the batch script writes its last lines as the step ends, after the state changes
    while "cancelled, not re-queued" not in (log := "".join(p.read_text() for p in logs.glob("*.out"))) \
            and time.time() < deadline:
        time.sleep(0.5)
    assert "stopped cleanly after writing its checkpoint" in log and "cancelled, not re-queued" in log, log[-3000:]
