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
