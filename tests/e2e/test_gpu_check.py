"""benchmarks/gpu_check.sh --cpu-smoke: the one-call device check runs end to end on CPU at toy sizes."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest
from helpers import REPO


@pytest.mark.slow  # ~60 s: run before a GPU check on a lent device (pytest -m slow tests/e2e/test_gpu_check.py)
def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DEADLINE": "600"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "log.txt").read_text()
    codes = re.findall(r"== (\w+) rc=(\d+)", log)
    assert [name for name, _ in codes] == ["compile", "pytest", "kernels_bench", "train_step"], log[-3000:]
    assert all(rc == "0" for _, rc in codes), log[-3000:]
    compiled = [json.loads(line) for line in (out / "compile.jsonl").read_text().splitlines()]
    assert compiled and all(not r["problems"] for r in compiled)
    steps = json.loads((out / "train_step.json").read_text())
    assert {r["variant"] for r in steps} == {"dense", "s2", "linear", "ring1"}
    assert all(r["tokens_per_s"] > 0 for r in steps)
    assert json.loads((out / "kernels.json").read_text())
    assert "longshard" in (out / "env.txt").read_text()
