"""Shared pieces of the end-to-end training tests: a tiny layout, prepared data, launching a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import torchrun_cmd

TINY = [
    "model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.attention=[{name: dense}]",
    "train.seq_len=64", "train.micro_batch_size=2", "train.global_batch_size=8", "optim.warmup_steps=2",
    "logging.wandb=disabled", "logging.progress=false", "eval.passkey_samples=0", "eval.val_batches=2",
]


# timeout: generous (a loaded 2-core machine is slow); a hang still ends the test
def _run(nproc: int, out: Path, data: Path, extra: list[str], env: dict, check: bool = True, timeout: int = 900):
    args = ["tiny_lm", *TINY, "data.source=prepared", f"data.path={data}", f"output_dir={out}", *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "longshard.train.main", *args]
    else:
        cmd = torchrun_cmd(nproc, "-m", "longshard.train.main", *args)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _losses(out: Path) -> list[float]:
    return json.loads((out / "report.json").read_text())["losses"]


def _kill_all(marker: str) -> None:
    """SIGKILL the launcher and every worker whose command line contains ``marker``."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd and int(d.name) != os.getpid():
            try:
                os.kill(int(d.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _tiny_hf_llama(path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


def _worker_pids(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker`` and runs longshard.train.main."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            state = next((ln for ln in (d / "status").read_text().splitlines() if ln.startswith("State:")), "")
        except OSError:
            continue
        if marker in cmd and "longshard.train.main" in cmd and "zombie" not in state:
            pids.append(int(d.name))
    return pids

