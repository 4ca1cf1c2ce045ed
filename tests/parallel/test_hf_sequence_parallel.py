"""Sequence parallelism for transformers models on gloo: Qwen2 and Llama with S2 and dense layers under
Ulysses, ring (ring attention and the sparsity-aware exchange) and hybrid 2 x 2: the ranks' mean loss
and their averaged gradients equal the unsharded model's (tests/dist/hf_sp_check.py)."""

from __future__ import annotations

import subprocess

import pytest
from helpers import REPO, torchrun_cmd

pytestmark = pytest.mark.dist
pytest.importorskip("transformers")


@pytest.mark.parametrize("nproc", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4: hybrid 2 x 2
def test_transformers_models_under_sequence_parallelism_match_unsharded(nproc, env_cpu):
    proc = subprocess.run(torchrun_cmd(nproc, str(REPO / "tests" / "dist" / "hf_sp_check.py")), env=env_cpu,
                          capture_output=True, text=True, timeout=900, cwd=REPO / "tests")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"hf sequence parallel P={nproc}:" in proc.stdout
