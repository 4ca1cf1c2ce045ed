"""The shell launchers: an install hint instead of `command not found`, CPU threads per process."""

from __future__ import annotations

import os
import subprocess

from helpers import REPO


def _stub_bin(tmp_path, name: str, body: str) -> str:
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    (d / name).write_text("#!/bin/bash\n" + body)
    (d / name).chmod(0o755)
    return str(d)


def test_deepspeed_script_without_deepspeed_names_the_install(tmp_path):
    env = dict(os.environ, PATH="/usr/bin:/bin")
    proc = subprocess.run(["bash", str(REPO / "launch" / "deepspeed.sh"), "quickstart"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "the deepspeed launcher is not installed. Fix: pip install 'longshard[deepspeed]'" in proc.stderr


def test_torchrun_script_gives_cpu_processes_the_cores(tmp_path):
    """No GPU: OpenMP threads = cores / NPROC unless set (torchrun alone would give every process 1)."""
    stub = _stub_bin(tmp_path, "python", 'echo "OMP=$OMP_NUM_THREADS $*"\n')
    _stub_bin(tmp_path, "nvidia-smi", "exit 1\n")
    env = dict(os.environ, PATH=f"{stub}:/usr/bin:/bin", NPROC="1")
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), "quickstart"], env=env,
                         capture_output=True, text=True, timeout=60).stdout
    assert f"OMP={len(os.sched_getaffinity(0))} " in out and "--nproc-per-node=1" in out
    env["OMP_NUM_THREADS"] = "3"
    out = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), "quickstart"], env=env,
                         capture_output=True, text=True, timeout=60).stdout
    assert "OMP=3 " in out
