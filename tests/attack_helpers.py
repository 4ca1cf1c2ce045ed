"""Helpers for the attack tests: rewriting a checkpoint file as an attacker who controls the folder."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

# a 1-process tiny_lm run small enough for an attack test (add train.steps and output_dir)
SMALL_RUN = ["tiny_lm", "train.nproc=1", "train.global_batch_size=4", "data.default_corpus_bytes=100000",
             "eval.passkey_samples=0", "eval.val_batches=1", "logging.wandb=disabled"]


def tamper(ckpt: Path, name: str, data: bytes) -> None:
    """Replace ``ckpt/name`` and fix the manifest too (an attacker controls every file of the folder)."""
    (ckpt / name).write_bytes(data)
    state_file = ckpt / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["files"][name] = [len(data), zlib.crc32(data)]
    state_file.write_text(json.dumps(state))


def run_sbatch_with_stub_srun(text: str, tmp_path: Path) -> list[str]:
    """Run an sbatch script with stub ``srun`` / ``scontrol`` that record srun's arguments; returns them."""
    import os
    import subprocess

    script = tmp_path / "job.sbatch"
    script.write_text(text)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    args_file = tmp_path / "args"
    (bin_dir / "srun").write_text(f"#!/usr/bin/env python3\nimport sys, json\n"
                                  f"open({str(args_file)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node1\n")
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node1", SLURM_JOB_ID="7")
    subprocess.run(["bash", str(script)], env=env, timeout=60, check=True)
    return json.loads(args_file.read_text())
