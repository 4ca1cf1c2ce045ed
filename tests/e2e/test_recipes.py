"""Every shipped recipe runs its first bf16 step (its layout shrunk to 2 CPU processes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import torchrun_cmd

pytestmark = pytest.mark.dist


def _tiny_hf_qwen2(path: Path) -> None:
    """A random Qwen2.5-0.5B-layout checkpoint at tiny width: 14 query / 2 KV heads, qkv bias, tied."""
    transformers = pytest.importorskip("transformers")
    import torch

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=320, hidden_size=112, intermediate_size=224, num_hidden_layers=2,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)


QWEN_TINY = ["model.vocab_size=320", "model.dim=112", "model.n_heads=14", "model.n_kv_heads=2"]


RECIPE_STEP = {  # recipe: (processes, overrides shrinking its layout to 2 CPU processes)
    "tiny_lm": (2, ["train.dtype=bf16", *QWEN_TINY]),  # ships fp32: its bf16 run on a Qwen layout
    "pretrain_small": (2, ["model.max_seq_len=512", "model.n_layers=2", *QWEN_TINY]),
    "continue_hf_yarn": (2, []),
    "continue_hf_gated": (2, []),  # Ulysses 2 over 14 / 2 heads
    # sparsity-aware ring over 2 ranks; small blocks so 256 tokens have far blocks (query shards on 14 / 2)
    "continue_hf_s2": (2, ["parallel.sp_degree=2", "model.attention=[{name: s2, options: {block: 16, "
                           "local_blocks: 2, vert_stride: 8, shard: auto}}]"]),
    # the model as transformers' own Qwen2 class with longshard's backend, S2 over the sparsity-aware ring
    "continue_transformers_s2": (2, ["parallel.sp_degree=2", "model.attention=[{name: s2, options: {block: 16, "
                                     "local_blocks: 2, vert_stride: 8, shard: auto}}]"]),
    "continue_hf_nosa": (1, []),  # with host-memory activation offload
    # MoH over Qwen2.5's 14 heads (the recipe ships 8 shared + top-16 of 24 for 32 heads): 4 + top-5 of 10
    # (and YaRN: the tiny checkpoint's context is shorter than the 256 tokens; the recipe keeps the context)
    "continue_hf_moh": (2, ["model.attention=[{name: moh, options: {shared_heads: 4, top_k: 5, router_std: 0.0}}]",
                            "init.rope_scaling=yarn", "init.rope_factor=4.0"]),
}


@pytest.mark.parametrize("recipe", sorted(RECIPE_STEP))
def test_every_shipped_recipe_runs_its_bf16_step(tmp_path, data_dir, env_cpu, recipe):
    """Each shipped recipe as it ships (bf16, its parallel layout shrunk to 2 processes) trains two steps
    on a real model layout (Qwen2.5: 14 heads / 2 KV heads), continue-training recipes from a tiny HF Qwen2."""
    from longshard.train.config import recipe_path

    nproc, extra = RECIPE_STEP[recipe]
    init = []
    if "hf_path: ???" in recipe_path(recipe).read_text():
        _tiny_hf_qwen2(tmp_path / "hf")
        init = [f"init.hf_path={tmp_path / 'hf'}"]
    out = tmp_path / "run"
    args = [recipe, *init, "data.source=prepared", f"data.path={data_dir}", f"output_dir={out}", "train.steps=2",
            "train.seq_len=256", "train.micro_batch_size=1", f"train.global_batch_size={2 * nproc}",
            "eval.passkey_samples=1", "eval.passkey_lengths=[256]", "eval.val_batches=1", "eval.every=0",
            "checkpoint.every=0", "logging.wandb=disabled", "logging.progress=false", *extra]
    cmd = torchrun_cmd(nproc, "-m", "longshard.train.main", *args) if nproc > 1 else \
        [sys.executable, "-m", "longshard.train.main", *args]
    proc = subprocess.run(cmd, env=env_cpu, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads((out / "report.json").read_text())
    resolved = (out / "config.yaml").read_text()
    assert "dtype: bf16" in resolved and "n_heads: 14" in resolved and "n_kv_heads: 2" in resolved
    assert len(report["losses"]) == 2 and all(0 < x < 20 for x in report["losses"])
    assert 0 < report["val_loss"] < 20

